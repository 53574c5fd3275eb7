"""Per-run checkpoints of the models protocol (`lidu_jax.study_models`): an interrupted population resumes
where it stopped instead of training every model again.

A population is a sequence of training runs (`lidu_jax.study_models_population.TrainingRun`); one run on
ML-100K takes up to 19 minutes on two CPU cores and a whole population about an hour, longer on larger data.
After each run the protocol saves, in ``<out_dir>/models_<data>.ckpt/``:

* ``run_<r>.npz``: the run's snapshot parameters (one stacked ensemble per snapshot epoch), leaf by leaf;
* ``run_<r>.json``: the run's measured rows and a header (data fingerprint, evaluation users, the settings
  that change a number, the run's table entry, and the parameter leaves' paths and shapes).

While a run trains, every ``CHECKPOINT_SECONDS`` of training (`lidu_jax.study_models_population`) its
training state is saved as ``run_<r>.partial.npz`` (parameters, optimiser state, the snapshots already
passed, the losses recorded and a header, in one file); ``--resume`` continues that run from the saved epoch,
and `lidu_jax.training.fit` makes the continued run end as the uninterrupted one. So a run longer than one
sitting (an SASRec population on a large data set) is not lost with the process.

The JSON is written last and marks the run as done, and both files are written beside their final name and
renamed over it, so a kill at any moment leaves only whole runs behind. ``--resume`` restores every done run
(rows, parameters) after checking each header against the present settings -- a differing one is named and
nothing is trained -- and trains the rest. The random keys of a run depend only on its index and on the
number of rows before it, so a resumed population gives the numbers of an uninterrupted one. For the same
reason ``--population-families`` may grow at the end on resume (the families saved, in order, then more:
``bpr,lightgcn,mlp`` -> ``bpr,lightgcn,mlp,sasrec``): the saved runs are the first runs of the larger
population, computed identically. The directory is removed once the result JSON is written, unless
``--keep-checkpoint`` keeps it for such a later resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lidu_jax import evaluation
from lidu_jax.models.base import RecModel
from lidu_jax.study_config import RealDataStudyConfig, config_defaults, setting_difference
from lidu_jax.training import FitState, fit_state_template, leaf_paths
from lidu_jax.types import InteractionSplit

__all__ = ["RunCheckpoints"]

# Settings that change no number of a run: where files go and how they are shown or chunked, the number of
# bootstrap resamples (used only across models, after every run), and the resume switch itself.
_IGNORED = frozenset({"out_dir", "json", "progress", "chunk", "n_boot", "resume", "keep_checkpoint"})
# Settings that change the training of one family only: a saved run of another family was computed
# identically under either value, so they are compared for that family's runs alone (a population saved
# without sasrec may add it with --sasrec-pack).
_FAMILY_SETTINGS = {"sasrec_pack": "sasrec"}


def _fingerprint(split: InteractionSplit, users: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (split.train_users, split.train_items, split.test_users, split.test_items, users):
        h.update(np.ascontiguousarray(a, np.int64).tobytes())
        h.update(b"|")
    for seq in split.train_sequences or ():
        h.update(np.ascontiguousarray(seq, np.int64).tobytes())
        h.update(b",")
    return h.hexdigest()


def _extends(recorded: Any, now: str) -> bool:
    """Whether ``now`` lists the families of ``recorded`` first, in the same order, and then more: run r of
    the shorter population is then run r of the longer one (same table entry, same keys, same rows before it),
    so its checkpoint is valid for the longer one."""
    if not isinstance(recorded, str):
        return False
    old = [f.strip() for f in recorded.split(",") if f.strip()]
    new = [f.strip() for f in now.split(",") if f.strip()]
    return len(new) > len(old) and new[: len(old)] == old


def _stacked_params(
    template: tuple[list[str], list[tuple[int, ...]], Any],
    leaves: list[np.ndarray],
    n_models: int,
    where: str,
) -> Any:
    """``leaves`` (one saved ``(n_models, ...)`` array per parameter leaf) rebuilt into the parameter tree of
    ``template`` (`_template` of the model, traced once per load), after checking every shape; a misfit is a
    ValueError starting ``--resume: <where> <leaf path>``."""
    paths, shapes, treedef = template
    for path, shape, leaf in zip(paths, shapes, leaves, strict=True):
        if leaf.shape != (n_models, *shape):
            raise ValueError(
                f"--resume: {where} {path} has shape {leaf.shape}, expected {(n_models, *shape)}"
            )
    return jax.tree.unflatten(treedef, [jax.numpy.asarray(x) for x in leaves])


def _template(model: RecModel) -> tuple[list[str], list[tuple[int, ...]], Any]:
    """Paths and shapes of one member's parameter leaves, and the tree to rebuild them into."""
    shapes = jax.eval_shape(lambda k: model.params(model.init(k)), jax.random.key(0))
    leaves, treedef = jax.tree.flatten(shapes)
    return leaf_paths(shapes), [tuple(x.shape) for x in leaves], treedef


class RunCheckpoints:
    """The checkpoint directory of one models-protocol run on one data set.

    Args:
      out_dir: the protocol's ``--out-dir``; the directory is ``<out_dir>/models_<data>.ckpt``.
      split: the loaded data. users: ``(U,)`` the evaluation users.
      config: the study settings; every field outside ``_IGNORED`` must match on resume (those of
        ``_FAMILY_SETTINGS`` only for their family's runs).
    """

    def __init__(
        self, out_dir: Path, split: InteractionSplit, users: np.ndarray, config: RealDataStudyConfig
    ) -> None:
        self.path = Path(out_dir) / f"models_{split.name}.ckpt"
        settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in _IGNORED}
        self._header = evaluation.json_safe(
            {"dataset": split.name, "data": _fingerprint(split, users), "settings": settings}
        )

    def open(self, resume: bool, n_runs: int) -> list[int]:
        """Check the directory against ``resume`` before any training; returns the indices of done runs.

        Raises:
          ValueError: ``resume`` without a checkpoint; a checkpoint left by an interrupted run without
            ``resume`` (it is never overwritten silently); or a done run whose header differs from the present
            settings (the first differing setting is named).
        """
        if not resume:
            if self.path.exists():
                raise ValueError(
                    f"{self.path} holds the runs of an interrupted --protocol models run: pass --resume to "
                    "continue it, or delete the directory to start over"
                )
            return []
        if not self.path.is_dir():
            raise ValueError(f"--resume: no checkpoint of an interrupted run at {self.path}")
        done = []
        for r in range(n_runs):
            header = self._read_header(r)
            if header is not None:
                self._check_header(header)
                done.append(r)
            elif (self.path / f"run_{r}.partial.npz").is_file():
                self._check_header(self._read_partial(r)[0])  # an unfinished run: checked before any training
        return done

    def _check_header(self, header: dict[str, Any]) -> None:
        for key in ("dataset", "data"):
            if header.get(key) != self._header[key]:
                what = "data set" if key == "dataset" else "data or evaluation users"
                raise ValueError(f"--resume: {self.path} was run on other {what} ({key} differs)")
        # An option added after the checkpoint was written ran as its default does (as --dynamics-merge).
        defaults = evaluation.json_safe(config_defaults())
        recorded = dict(header.get("settings", {}))
        if _extends(recorded.get("population_families"), self._header["settings"]["population_families"]):
            recorded["population_families"] = self._header["settings"]["population_families"]
        family = header.get("run", {}).get("family")
        ignored = [name for name, fam in _FAMILY_SETTINGS.items() if fam != family]
        diff = setting_difference(recorded, self._header["settings"], ignored=ignored, defaults=defaults)
        if diff is not None:
            raise ValueError(f"--resume: {self.path} {diff}")

    def _read_header(self, r: int) -> dict[str, Any] | None:
        path = self.path / f"run_{r}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())["header"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--resume: {path} is damaged ({e}); delete it to train run {r} again") from None

    def save(self, r: int, run: Any, model: RecModel, rows: list[dict], params: list[Any]) -> None:
        """Save run ``r``: its ``rows`` and stacked ``params`` (one of each per snapshot epoch)."""
        self.path.mkdir(parents=True, exist_ok=True)
        paths, _, _ = _template(model)
        arrays = {
            f"s{s}_l{i}": np.asarray(leaf)
            for s, p in enumerate(params)
            for i, leaf in enumerate(jax.tree.leaves(p))
        }

        def write_npz(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        evaluation.write_atomically(self.path / f"run_{r}.npz", write_npz)
        header = {**self._header, "run": dataclasses.asdict(run), "leaves": paths, "n_snapshots": len(params)}
        # The rows keep NaN as NaN (Python's JSON reads it back), so a restored row equals the measured one.
        payload = {"header": evaluation.json_safe(header), "rows": rows}
        evaluation.write_json(payload, self.path / f"run_{r}.json")
        (self.path / f"run_{r}.partial.npz").unlink(missing_ok=True)  # the run is whole now

    def save_partial(
        self, r: int, run: Any, model: RecModel, state: FitState, losses: dict[int, float], seconds: float
    ) -> None:
        """Save the training state of unfinished run ``r`` after ``state.epoch`` epochs, with the ``losses``
        recorded at the snapshot epochs passed and the ``seconds`` of training so far, in one file replaced
        atomically (a kill while writing leaves the previous one)."""
        self.path.mkdir(parents=True, exist_ok=True)
        header = {
            **self._header,
            "run": dataclasses.asdict(run),
            "epoch": state.epoch,
            "losses": {str(e): v for e, v in losses.items()},
            "seconds": seconds,
            "state_leaves": leaf_paths(state.state),
            "snapshot_epochs": sorted(state.snapshots),
        }
        arrays = {f"state_l{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state.state))}
        for e, p in state.snapshots.items():
            arrays.update({f"snap{e}_l{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(p))})
        arrays["first_bad_loss"] = np.asarray(state.first_bad_loss, np.int32)
        arrays["header"] = np.array(json.dumps(evaluation.json_safe(header)))

        def write_npz(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        evaluation.write_atomically(self.path / f"run_{r}.partial.npz", write_npz)

    def _read_partial(self, r: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        path = self.path / f"run_{r}.partial.npz"
        try:
            with np.load(path) as z:
                arrays = {name: z[name] for name in z.files}
            return json.loads(str(arrays.pop("header"))), arrays
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(
                f"--resume: {path} is damaged ({e}); delete it to train run {r} from the start"
            ) from None

    def load_partial(
        self, r: int, run: Any, model: RecModel, n_models: int
    ) -> tuple[FitState, dict[int, float], float] | None:
        """``(state, losses, seconds)`` of run ``r``'s saved training state, or None when it has none.

        Raises:
          ValueError: the file is damaged, was saved with other settings or data, for another table entry, or
            holds a state that does not fit ``model`` x ``n_models`` (each named).
        """
        path = self.path / f"run_{r}.partial.npz"
        if not path.is_file():
            return None
        header, arrays = self._read_partial(r)
        self._check_header(header)
        if header["run"] != evaluation.json_safe(dataclasses.asdict(run)):
            raise ValueError(f"--resume: {path} is of run {header['run']}, the table has {run}")
        template = fit_state_template(model, n_models)
        paths = leaf_paths(template)
        if header["state_leaves"] != paths:
            raise ValueError(f"--resume: {path} holds the training state of another model than {model.name}")
        treedef = jax.tree.structure(template)
        state = jax.tree.unflatten(treedef, [arrays[f"state_l{i}"] for i in range(len(paths))])
        params_template = _template(model)
        snaps = {
            int(e): _stacked_params(
                params_template,
                [arrays[f"snap{e}_l{i}"] for i in range(len(params_template[0]))], n_models,
                f"{path}: the epoch-{e} snapshot's",
            )
            for e in header["snapshot_epochs"]
        }  # fmt: skip
        fit_state = FitState(int(header["epoch"]), state, snaps, arrays["first_bad_loss"])
        losses = {int(e): float(v) for e, v in header["losses"].items()}
        return fit_state, losses, float(header["seconds"])

    def load(self, r: int, run: Any, model: RecModel, n_models: int) -> tuple[list[dict], list[Any]]:
        """The rows and stacked snapshot params of done run ``r``, rebuilt into ``model``'s parameter tree.

        Raises:
          ValueError: the saved run is another table entry, or its leaves do not fit ``model``'s parameters.
        """
        saved = json.loads((self.path / f"run_{r}.json").read_text())
        header = saved["header"]
        if header["run"] != evaluation.json_safe(dataclasses.asdict(run)):
            raise ValueError(f"--resume: run {r} in {self.path} is {header['run']}, the table has {run}")
        template = _template(model)
        paths = template[0]
        if header["leaves"] != paths:
            raise ValueError(f"--resume: run {r} in {self.path} holds other parameters than {model.name}")
        with np.load(self.path / f"run_{r}.npz") as z:
            params = [
                _stacked_params(
                    template,
                    [z[f"s{s}_l{i}"] for i in range(len(paths))],
                    n_models,
                    f"run {r} in {self.path}:",
                )
                for s in range(header["n_snapshots"])
            ]
        return saved["rows"], params

    def remove(self) -> None:
        """Delete the directory (after the result JSON is written)."""
        shutil.rmtree(self.path, ignore_errors=True)
