"""Generic training driver: M copies of any `RecModel` trained at once with `jax.vmap`, and chunked scoring.

An ensemble over seeds is ``fit(model, keys, ones)``; a bootstrap is ``fit(model, keys, multinomial_counts)``;
a snapshot ensemble is ``fit(model, keys[:1], ones[:1], epochs, snapshot_epochs=(...))``.

A run that diverges (NaN/inf parameters or scores, e.g. a learning rate far too large) is a
`TrainingFailedError` raised here, so it is never passed on as if it were a trained model's output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lidu_jax.models.base import RecModel

PyTree = Any

__all__ = [
    "FitState",
    "TrainingFailedError",
    "bootstrap_weights",
    "check_finite_scores",
    "failure_context",
    "fit",
    "fit_state_template",
    "flatten_snapshots",
    "score_users",
]


class TrainingFailedError(RuntimeError):
    """Training diverged: a copy's parameters or scores are NaN/inf.

    Attributes:
      exit_code: 3, the exit status the command lines give this failure (2 is a bad flag or input).
      model: the `RecModel` name.
      members: indices of the failed copies (along the stacked ``M`` axis, i.e. ``keys[m]``).
    """

    exit_code = 3

    def __init__(self, message: str, *, model: str = "", members: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.model = model
        self.members = tuple(int(m) for m in members)


@contextlib.contextmanager
def failure_context(context: str) -> Iterator[None]:
    """Re-raise a `TrainingFailedError` of the ``with`` body as ``"<message> [<context>]"``, same model and
    members, chained to the original.

    The training code knows which copy diverged; only its caller knows which run that was (cell, family,
    seed, learning rate), so each caller adds that here and the one-line CLI error names both.
    """
    try:
        yield
    except TrainingFailedError as e:
        raise TrainingFailedError(f"{e} [{context}]", model=e.model, members=e.members) from e


_ADVICE = "lower the learning rate (the model config's lr; --lr on the command line)"


def _listing(members: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(m) for m in members[:limit])
    return shown + (f", ... ({len(members)} in all)" if len(members) > limit else "")


@jax.jit
def _finite_members(stacked: PyTree) -> jax.Array:
    """``(M,)`` bool: every float leaf of copy m is finite."""
    flags = [
        jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1)
        for x in jax.tree.leaves(stacked)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    if not flags:  # e.g. integer counts only: nothing can be NaN
        return jnp.ones(jax.tree.leaves(stacked)[0].shape[0], bool)
    return jnp.stack(flags).all(axis=0)


@jax.jit
def _note_nonfinite(first_bad: jax.Array, losses: jax.Array, epoch: jax.Array) -> jax.Array:
    return jnp.where((first_bad == 0) & ~jnp.isfinite(losses), epoch, first_bad)


def _check_trained(model: RecModel, params: PyTree, first_bad_loss: jax.Array, what: str) -> None:
    if not jax.tree.leaves(params):
        return
    ok = np.asarray(_finite_members(params))
    if ok.all():
        return
    bad = np.flatnonzero(~ok).tolist()
    epochs = np.asarray(first_bad_loss)
    seen = sorted({int(epochs[m]) for m in bad if epochs[m] > 0})
    loss = f"; the loss first became NaN/inf at epoch {seen[0]}" if seen else ""
    who = model.name if ok.size == 1 else f"{model.name} copy {_listing(bad)} of {ok.size} (keys[m] of fit)"
    raise TrainingFailedError(
        f"training failed: {who} has NaN/inf {what}{loss}: the training diverged; {_ADVICE}",
        model=model.name,
        members=bad,
    )


def check_finite_scores(
    scores: jax.Array, model_name: str, *, unit: str = "copy", when: str = "after training"
) -> None:
    """Raises `TrainingFailedError` when the scores ``(M, ...)`` of M copies (ensemble members, snapshots;
    ``unit`` names them, e.g. "dropout pass") hold NaN or inf: weights that overflow mean the training
    diverged, and such scores must not reach an estimator as if they were a model's output."""
    scores = jnp.asarray(scores)
    ok = np.asarray(jnp.isfinite(scores).reshape(scores.shape[0], -1).all(axis=1))
    if ok.all():
        return
    bad = np.flatnonzero(~ok).tolist()
    who = model_name if ok.size == 1 else f"{model_name} {unit} {_listing(bad)} of {ok.size}"
    raise TrainingFailedError(
        f"training failed: {who} gives NaN/inf scores {when}: the training diverged; {_ADVICE}",
        model=model_name,
        members=bad,
    )


@dataclasses.dataclass(frozen=True)
class FitState:
    """Where a `fit` stands after ``epoch`` epochs: everything needed to continue it exactly.

    Epoch e's randomness is ``fold_in(key, e)`` (see `fit`), so a run continued from a `FitState` takes the
    steps an uninterrupted run takes and ends with the same parameters.

    Attributes:
      epoch: epochs done (>= 1).
      state: the stacked training state of the M copies (parameters and optimiser), as ``model.init`` makes
        it, with a leading ``M`` axis (its shapes: `fit_state_template`).
      snapshots: snapshot epoch -> stacked parameters, for the snapshot epochs already passed.
      first_bad_loss: ``(M,)`` int32, the first epoch whose loss was NaN/inf per copy (0 = none yet).
    """

    epoch: int
    state: PyTree
    snapshots: dict[int, PyTree]
    first_bad_loss: np.ndarray


def fit_state_template(model: RecModel, m: int) -> PyTree:
    """The shapes and dtypes (``jax.ShapeDtypeStruct`` leaves) of `fit`'s stacked training state for ``m``
    copies of ``model``; computed abstractly, nothing is initialised."""
    init, _, _ = _compiled(model)
    return jax.eval_shape(init, jax.random.split(jax.random.key(0), m))


def leaf_paths(tree: PyTree) -> list[str]:
    """The key path of every leaf of ``tree`` (``jax.tree_util.keystr``), in flattening order: the names a
    saved state is checked and reported by."""
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _check_resume(model: RecModel, start: FitState, m: int, epochs: int, snaps: list[int]) -> None:
    """ValueError naming what in ``start`` cannot continue this `fit` (before any training step)."""
    if not 1 <= start.epoch <= epochs:
        raise ValueError(f"resume_from.epoch must lie in [1, epochs={epochs}], got {start.epoch}")
    want = fit_state_template(model, m)
    paths = leaf_paths(want)
    if leaf_paths(start.state) != paths:
        raise ValueError(f"resume_from.state is not a training state of {model.name} (its leaves differ)")
    for path, got, ref in zip(paths, jax.tree.leaves(start.state), jax.tree.leaves(want), strict=True):
        if tuple(np.shape(got)) != tuple(ref.shape):
            raise ValueError(
                f"resume_from.state{path} has shape {tuple(np.shape(got))}, "
                f"{model.name} x{m} needs {tuple(ref.shape)}"
            )
    passed = sorted(e for e in snaps if e <= start.epoch)
    if sorted(start.snapshots) != passed:
        raise ValueError(
            f"resume_from after epoch {start.epoch} must hold the snapshots of epochs {passed}, "
            f"got {sorted(start.snapshots)}"
        )
    if np.shape(start.first_bad_loss) != (m,):
        raise ValueError(
            f"resume_from.first_bad_loss must have shape ({m},), got {np.shape(start.first_bad_loss)}"
        )


@functools.lru_cache(maxsize=64)
def _compiled(model: RecModel):
    """Jitted, vmapped init / train_epoch / params of a model, cached so repeated fits reuse compilations."""
    return (
        jax.jit(jax.vmap(model.init)),
        jax.jit(jax.vmap(model.train_epoch)),
        jax.jit(jax.vmap(model.params)),
    )


@jax.jit
def _fold_all(keys: jax.Array, epoch: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, epoch)


def fit(
    model: RecModel,
    keys: jax.Array,
    weights: jax.Array,
    epochs: int,
    *,
    snapshot_epochs: Sequence[int] = (),
    progress: bool = True,
    callback: Callable[[int, PyTree, jax.Array], None] | None = None,
    resume_from: FitState | None = None,
    checkpoint: Callable[[FitState], None] | None = None,
    checkpoint_seconds: float = 600.0,
) -> tuple[PyTree, PyTree | None]:
    """Train M independent copies of ``model`` with one jitted ``vmap(model.train_epoch)`` per epoch.

    Copy m is initialised with ``model.init(split(keys[m])[0])`` and epoch e (1-based) uses the key
    ``fold_in(split(keys[m])[1], e)``, so the same keys give the same parameters (and, with threefry keys,
    copy m equals a separate run from ``keys[m]``).

    Args:
      model: a `RecModel`.
      keys: ``(M, 2)`` uint32 PRNG keys (or ``(M,)`` typed keys), one per copy.
      weights: ``(M, n_train)`` float per-interaction weights (ones, or bootstrap multinomial counts).
      epochs: number of epochs (>= 1).
      snapshot_epochs: 1-based epochs after which the parameters are stored (snapshot ensemble).
      progress: show a tqdm bar over epochs with the mean loss.
      callback: ``callback(epoch, params, losses)`` after each epoch with stacked params and ``(M,)`` losses
        (e.g. to track LiDu over training). With ``resume_from`` it is called for the remaining epochs only.
      resume_from: a `FitState` saved by ``checkpoint`` of an interrupted run with the same model, keys,
        weights and snapshot epochs: training continues after its epoch and ends as the uninterrupted run.
      checkpoint: ``checkpoint(FitState)`` after an epoch once ``checkpoint_seconds`` have passed since the
        start or the last call (never after the last epoch, whose result is returned), so a long run can be
        saved and continued by a later process. ``checkpoint_seconds=0`` calls it after every epoch.

    Returns:
      ``(params, snapshots)``: the final parameters stacked with a leading ``M`` axis, and the snapshots
      stacked as ``(len(snapshot_epochs), M, ...)`` in the order given (``None`` when no snapshot epochs).

    Raises:
      ValueError: bad weights, epochs or snapshot epochs.
      TrainingFailedError: a copy's final (or snapshot) parameters are NaN/inf; the message names the
        model, the copies (index m of ``keys``) and the epoch where the loss first went non-finite.
    """
    keys = jnp.asarray(keys)
    weights = jnp.asarray(weights, jnp.float32)
    m = keys.shape[0]
    if weights.ndim != 2 or weights.shape[0] != m:
        raise ValueError(f"weights must have shape (M={m}, n_train), got {weights.shape}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    snaps_wanted = [int(e) for e in snapshot_epochs]
    if any(e < 1 or e > epochs for e in snaps_wanted):
        raise ValueError(f"snapshot_epochs must lie in [1, {epochs}], got {snaps_wanted}")
    if not bool(jnp.all(jnp.isfinite(weights))) or bool(jnp.any(weights < 0)):
        raise ValueError("weights must be finite and non-negative")
    if checkpoint_seconds < 0:
        raise ValueError(f"checkpoint_seconds must be >= 0, got {checkpoint_seconds}")

    init_keys, run_keys = jax.vmap(jax.random.split)(keys).swapaxes(0, 1)
    init, step, get_params = _compiled(model)
    if resume_from is None:
        state, first = init(init_keys), 1
        snapshots: dict[int, PyTree] = {}
        first_bad_loss = jnp.zeros((m,), jnp.int32)  # on device, so tracking it costs no sync per epoch
    else:
        _check_resume(model, resume_from, m, epochs, snaps_wanted)
        state, first = jax.tree.map(jnp.asarray, resume_from.state), resume_from.epoch + 1
        snapshots = {int(e): jax.tree.map(jnp.asarray, p) for e, p in resume_from.snapshots.items()}
        first_bad_loss = jnp.asarray(resume_from.first_bad_loss, jnp.int32)
    last_save = time.monotonic()
    bar = tqdm(range(first, epochs + 1), desc=f"train {model.name} x{m}", disable=not progress, leave=False)
    for epoch in bar:
        state, losses = step(state, _fold_all(run_keys, jnp.asarray(epoch, jnp.uint32)), weights)
        first_bad_loss = _note_nonfinite(first_bad_loss, losses, jnp.asarray(epoch, jnp.int32))
        if progress:
            bar.set_postfix(loss=f"{float(jnp.mean(losses)):.4f}")
        if epoch in snaps_wanted or callback is not None:
            params = get_params(state)
            if epoch in snaps_wanted:
                snapshots[epoch] = params
            if callback is not None:
                callback(epoch, params, losses)
        if checkpoint is not None:
            # Dispatch is asynchronous: without this wait the loop queues every epoch up to the next sync in
            # a moment, the clock below measures queuing instead of training, and no state is saved between
            # snapshot epochs. One wait per epoch (a whole pass over the data) costs little.
            losses.block_until_ready()
            if epoch < epochs and time.monotonic() - last_save >= checkpoint_seconds:
                checkpoint(FitState(epoch, state, dict(snapshots), np.asarray(first_bad_loss)))
                last_save = time.monotonic()
    bar.close()
    final = get_params(state)
    _check_trained(model, final, first_bad_loss, "parameters after the last epoch")
    for e in snaps_wanted:
        _check_trained(model, snapshots[e], first_bad_loss, f"parameters in the snapshot of epoch {e}")
    stacked = None
    if snaps_wanted:
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[snapshots[e] for e in snaps_wanted])
    return final, stacked


def bootstrap_weights(key: jax.Array, m: int, n_train: int) -> jax.Array:
    """``(m, n_train)`` float32 multinomial counts: each row resamples the n_train interactions with
    replacement (``Multinomial(n_train, 1/n_train)``), so row sums are ``n_train``."""
    if m < 1 or n_train < 1:
        raise ValueError(f"m and n_train must be >= 1, got {m}, {n_train}")
    draws = jax.random.randint(key, (m, n_train), 0, n_train)
    return jax.vmap(lambda d: jnp.bincount(d, length=n_train))(draws).astype(jnp.float32)


def flatten_snapshots(snapshots: PyTree) -> PyTree:
    """Merge the ``(S, M, ...)`` snapshot axes of `fit` into one ``(S * M, ...)`` model axis."""
    return jax.tree.map(lambda x: x.reshape((-1, *x.shape[2:])), snapshots)


def score_users(
    model: RecModel,
    stacked_params: PyTree,
    users: jax.Array | np.ndarray,
    *,
    chunk: int = 1024,
    key: jax.Array | None = None,
) -> jax.Array:
    """Full-catalogue scores of every copy for ``users``, computed ``chunk`` users at a time.

    Args:
      model: the `RecModel` the parameters belong to.
      stacked_params: parameters with a leading ``M`` axis (from `fit`).
      users: ``(U,)`` int user ids.
      chunk: users per jitted call (bounds peak memory at ``M * chunk * n_items`` scores per call).
      key: ``None`` for the deterministic forward pass, or a PRNG key for stochastic scoring (MC dropout);
        copy m on chunk c uses ``fold_in(fold_in(key, c), m)``.

    Returns:
      ``(M, U, n_items)`` float32 scores (training items NOT masked).

    Raises:
      TrainingFailedError: a copy's scores are NaN/inf (its weights overflow: the training diverged).
    """
    users = np.asarray(users)
    if users.ndim != 1:
        raise ValueError(f"users must be 1-D, got shape {users.shape}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    m = jax.tree.leaves(stacked_params)[0].shape[0]
    if key is None:
        fn = jax.jit(jax.vmap(lambda p, u: model.score(p, u, None), in_axes=(0, None)))
    else:
        fn = jax.jit(jax.vmap(model.score, in_axes=(0, None, 0)))
    out = []
    for c, start in enumerate(range(0, users.shape[0], chunk)):
        u = users[start : start + chunk]
        n_real = u.shape[0]
        if n_real < chunk and users.shape[0] > chunk:  # pad the last chunk so one compilation serves all
            u = np.concatenate([u, np.full(chunk - n_real, u[-1], u.dtype)])
        u = jnp.asarray(u, jnp.int32)
        if key is None:
            s = fn(stacked_params, u)
        else:
            ck = jax.random.fold_in(key, c)
            s = fn(stacked_params, u, jax.vmap(lambda i, ck=ck: jax.random.fold_in(ck, i))(jnp.arange(m)))
        out.append(s[:, :n_real])
    scores = jnp.concatenate(out, axis=1)
    check_finite_scores(scores, model.name)
    return scores
