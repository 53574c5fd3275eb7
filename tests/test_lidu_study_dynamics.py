"""The dynamics protocol (`lidu_jax.study_dynamics`) end to end on a tiny time-ordered file, its per-user
history changes, and its rejection of bad settings before any training."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from lidu_jax import study_dynamics as sd
from lidu_jax.study_cells import load_data
from lidu_jax.study_config import RealDataStudyConfig

N_ITEMS = 16  # small enough that LiDu's item pruning never changes the compiled shape: one compilation
# The three inference paths (a fixed user embedding, a propagation graph, an input sequence). mlp takes
# bpr's path in the protocol; its training alone would add ~10 s of compilation to this file.
FAMILIES = ("bpr", "lightgcn", "sasrec")


@dataclasses.dataclass(frozen=True)
class _Config(RealDataStudyConfig):
    """The study config with the protocol's own options as fields (what the CLI wiring adds)."""

    dynamics_hide_fraction: float = 0.5
    dynamics_add_fraction: float = 0.5
    dynamics_candidates: str = "6,10"
    dynamics_families: str = ",".join(FAMILIES)
    dynamics_merge: bool = False


def _tiny_lines(n_users: int = 48) -> list[list[int]]:
    # User u mostly holds items of group u % 4, so the models have something to learn in 10 epochs.
    rng = np.random.default_rng(0)
    rows = []
    for u in range(1, n_users + 1):
        group = np.arange(N_ITEMS)[np.arange(N_ITEMS) % 4 == u % 4]
        items = np.concatenate([rng.choice(group, 3, replace=False), rng.choice(N_ITEMS, 3, replace=False)])
        rows.append([u, *dict.fromkeys(int(i) + 1 for i in items)])
    return rows


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """Sequence format ("user item1 item2 ..."): time order, so SASRec runs."""
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text("\n".join(" ".join(map(str, r)) for r in _tiny_lines()) + "\n")
    return path


@pytest.fixture(scope="module")
def unordered_file(tmp_path_factory):
    """Table format without timestamps: no time order."""
    path = tmp_path_factory.mktemp("data") / "table.txt"
    path.write_text("\n".join(f"{r[0]}\t{i}" for r in _tiny_lines() for i in r[1:]) + "\n")
    return path


def _config(data, out_dir, **kw) -> _Config:
    base = dict(
        data=str(data), k_core=2, n_models=2, epochs=10, k=3, grid_size=16, dim=4, chunk=64,
        dynamics_users=32, out_dir=str(out_dir), progress=False,
    )  # fmt: skip
    return _Config(**{**base, **kw})


@pytest.fixture(scope="module")
def protocol(tiny_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("dynamics")
    return sd.run_dynamics_protocol(_config(tiny_file, out)), out


def test_protocol_writes_documented_files_and_one_checkpoint_per_epoch(protocol):
    result, out = protocol
    for ext in ("json", "md", "png"):
        assert (out / f"dynamics_tiny.{ext}").is_file(), ext
    payload = json.loads((out / "dynamics_tiny.json").read_text())
    top = {"dataset", "n_users", "n_items", "k", "n_models", "epochs", "seed", "settings", "families"}
    assert top | {"seconds", "files", "config"} <= set(payload)
    assert payload["dataset"] == "tiny" and payload["n_users"] == 32 and payload["epochs"] == 10
    assert payload["settings"]["candidate_sizes"] == [6, 10]
    assert payload["config"]["dynamics_families"] == ",".join(FAMILIES)
    assert tuple(payload["families"]) == FAMILIES
    row_keys = {"epoch", "mean_lidu", "mean_ndcg", "mean_std", "mean_top_k_std", "loss"}
    for fam, res in payload["families"].items():
        tr = res["training"]
        assert tr["n_checkpoints"] == 10 and [r["epoch"] for r in tr["log"]] == list(range(1, 11)), fam
        assert all(set(r) == row_keys for r in tr["log"])
        assert all(r["mean_lidu"] > 0 and 0 <= r["mean_ndcg"] <= 1 for r in tr["log"])
        for v in (tr["kendall_tau_neg_lidu_vs_ndcg"], tr["spearman_neg_lidu_vs_ndcg"]):
            assert v is None or -1 <= v <= 1
        assert set(tr["baselines"]) == {"mean_std", "mean_top_k_std"}
        assert set(res["inference"]) == {"hide", "add", "candidates_6", "candidates_10"}
        for change, r in res["inference"].items():
            assert r["n_users"] == 32 and r["what"], (fam, change)
            for name in ("kendall_tau_delta", "kendall_tau_sign", "kendall_tau_before", "sign_agreement"):
                assert r[name] is None or -1 <= r[name] <= 1, (fam, change, name)
    md = (out / "dynamics_tiny.md").read_text()
    assert "| sasrec | hide |" in md and "τ(−LiDu, NDCG)" in md
    assert result["families"]["bpr"]["inference"]["hide"] == payload["families"]["bpr"]["inference"]["hide"]


def test_each_inference_change_changes_what_it_claims(protocol):
    fams = protocol[0]["families"]
    for fam in ("sasrec", "lightgcn"):  # these models read the history at inference: their scores move
        for change in ("hide", "add"):
            assert fams[fam]["inference"][change]["mean_abs_score_change"] > 1e-4, (fam, change)
    for fam in ("bpr",):  # a fixed user embedding: only the candidate set moves
        for change in ("hide", "add"):
            r = fams[fam]["inference"][change]
            assert r["mean_abs_score_change"] == 0.0 and "candidate set" in r["what"], (fam, change)
        # The hidden items were trained as positives: back among the candidates they enter many lists.
        assert fams[fam]["inference"]["hide"]["frac_lists_changed"] > 0.2, fam
    for fam, res in fams.items():
        for size in (6, 10):
            r = res["inference"][f"candidates_{size}"]
            # Same scores, the list kept: NDCG identical, and fewer competitors below the list.
            assert r["frac_lists_changed"] == 0.0 and r["mean_abs_score_change"] == 0.0, fam
            assert r["mean_ndcg_after"] == r["mean_ndcg_before"] and r["kendall_tau_delta"] is None
            assert r["mean_lidu_after"] <= r["mean_lidu_before"] + 1e-3, (fam, size)
        small, large = res["inference"]["candidates_6"], res["inference"]["candidates_10"]
        assert small["mean_lidu_after"] <= large["mean_lidu_after"] + 1e-3, fam


def test_history_changes_per_user(tiny_file, tmp_path):
    config = _config(tiny_file, tmp_path)
    split = load_data(config)
    us = sd._pick_users(split, config, sd.dynamics_settings(config))
    assert us.ids.size == 32 and np.all(np.diff(us.ids) > 0)
    hide, add = sd._visible_sequences(us, "hide"), sd._visible_sequences(us, "add")
    for row, u in enumerate(us.ids):
        prof = us.profile[row]
        np.testing.assert_array_equal(prof, split.train_sequences[u])
        n = prof.size
        assert us.hidden[row].size == min(n - 1, int(0.5 * n + 0.5)) and set(us.hidden[row]) <= set(prof)
        kept = [i for i in prof if i not in set(us.hidden[row])]
        np.testing.assert_array_equal(hide[row], kept)  # thinned, order kept
        assert us.added[row].size == int(0.5 * n + 0.5)
        assert not set(us.added[row]) & (set(prof) | set(np.flatnonzero(us.test[row])))
        assert sorted(add[row]) == sorted([*prof, *us.added[row]])
        np.testing.assert_array_equal([i for i in add[row] if i in set(prof)], prof)
    cand = {c: sd._candidates(us, c) for c in ("base", "hide", "add")}
    np.testing.assert_array_equal(cand["base"], ~us.train)
    np.testing.assert_array_equal(cand["hide"] & ~cand["base"], us.hidden_mask)
    np.testing.assert_array_equal(cand["base"] & ~cand["add"], us.added_mask)
    assert not (cand["add"] & us.added_mask).any() and (cand["base"] | ~us.test).all()


def test_unordered_data_skips_sasrec_with_the_reason(unordered_file, tmp_path):
    config = _config(unordered_file, tmp_path, split="random", dynamics_families="sasrec")
    result = sd.run_dynamics_protocol(config)
    assert "time-ordered" in result["families"]["sasrec"]["skipped"]
    assert (tmp_path / "dynamics_table.json").is_file() and (tmp_path / "dynamics_table.md").is_file()


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(epochs=9), "--epochs must be >= 10"),
        (dict(dynamics_users=1), "--dynamics-users must be >= 2"),
        (dict(dynamics_hide_fraction=1.0), "--dynamics-hide-fraction must be in"),
        (dict(dynamics_add_fraction=0.0), "--dynamics-add-fraction must be in"),
        (dict(dynamics_candidates="3,10"), "--dynamics-candidates must be one or more sizes > --k=3"),
        (dict(dynamics_candidates="ten"), "--dynamics-candidates must be comma-separated integers"),
        (dict(dynamics_families="bpr,gru"), "--dynamics-families must be a non-empty subset"),
        (dict(k=N_ITEMS, dynamics_candidates="20"), f"--k={N_ITEMS} must be < the number of items"),
    ],
)
def test_bad_settings_fail_before_training(settings, match, tiny_file, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(sd, "build_source", no_training)
    with pytest.raises(ValueError, match=match):
        sd.run_dynamics_protocol(_config(tiny_file, tmp_path / "out", **settings))
    assert not (tmp_path / "out").exists()


def test_options_default_when_the_config_lacks_them(tiny_file, tmp_path):
    plain = RealDataStudyConfig(data=str(tiny_file), epochs=10, k=3, out_dir=str(tmp_path))
    s = sd.dynamics_settings(plain)
    assert s.hide_fraction == 0.5 and s.add_fraction == 0.5 and s.candidate_sizes == (100, 1000)
    assert s.families == ("bpr", "lightgcn", "mlp", "sasrec")


def test_merge_keeps_the_earlier_families_and_reruns_the_named_one(protocol, tmp_path):
    # A family run on its own must give the numbers it gave beside the others (same key, own rng).
    result, out = protocol
    (tmp_path / "dynamics_tiny.json").write_text((out / "dynamics_tiny.json").read_text())
    merged = sd.run_dynamics_protocol(
        _config(tiny_file_of(result), tmp_path, dynamics_families="bpr", dynamics_merge=True)
    )
    assert list(merged["families"]) == list(FAMILIES)
    assert merged["merged"] == {"kept": ["lightgcn", "sasrec"], "run": ["bpr"]}
    assert list(merged["settings"]["families"]) == list(FAMILIES)
    earlier = json.loads((out / "dynamics_tiny.json").read_text())
    for f in ("lightgcn", "sasrec"):
        assert merged["families"][f] == earlier["families"][f]
    new, old = merged["families"]["bpr"]["training"]["log"], result["families"]["bpr"]["training"]["log"]
    for key in ("mean_lidu", "mean_ndcg", "mean_std", "loss"):
        np.testing.assert_allclose([r[key] for r in new], [r[key] for r in old], rtol=1e-5, atol=1e-6)
    on_disk = json.loads((tmp_path / "dynamics_tiny.json").read_text())
    assert list(on_disk["families"]) == list(FAMILIES) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(epochs=11), "was run with epochs=10, this run has 11"),
        (dict(grid_size=32), "was run with --grid-size=16, this run has 32"),
        (dict(dynamics_candidates="6,12"), "was run with settings="),
    ],
)
def test_merge_refuses_an_earlier_run_with_other_settings(protocol, settings, match, tmp_path, monkeypatch):
    result, out = protocol
    earlier = (out / "dynamics_tiny.json").read_text()
    (tmp_path / "dynamics_tiny.json").write_text(earlier)

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(sd, "build_source", no_training)
    config = _config(tiny_file_of(result), tmp_path, dynamics_families="bpr", dynamics_merge=True, **settings)
    with pytest.raises(ValueError, match=match):
        sd.run_dynamics_protocol(config)
    assert (tmp_path / "dynamics_tiny.json").read_text() == earlier  # untouched


def test_merge_accepts_an_earlier_run_from_before_an_option_existed(protocol, tmp_path, monkeypatch):
    # A run written before an option was added has no entry for it; it ran as the option's default does.
    result, out = protocol
    earlier = json.loads((out / "dynamics_tiny.json").read_text())
    del earlier["config"]["grid_size"]  # stands for an option added later (its default, 256, is not used)
    (tmp_path / "dynamics_tiny.json").write_text(json.dumps(earlier))
    monkeypatch.setattr(sd, "build_source", lambda *a, **k: pytest.fail("training started"))
    config = _config(tiny_file_of(result), tmp_path, dynamics_families="bpr", dynamics_merge=True)
    with pytest.raises(ValueError, match="was run with --grid-size=256, this run has 16"):
        sd.run_dynamics_protocol(config)  # absent = the default, which differs from this run's 16
    del earlier["config"]["dynamics_users"]  # default 500; this run has 32
    earlier["config"]["grid_size"] = 16
    (tmp_path / "dynamics_tiny.json").write_text(json.dumps(earlier))
    with pytest.raises(ValueError, match="--dynamics-users=500, this run has 32"):
        sd.run_dynamics_protocol(config)
    earlier["config"].pop("resume", None)  # a user-protocol option this protocol ignores
    earlier["config"]["dynamics_users"] = 32
    (tmp_path / "dynamics_tiny.json").write_text(json.dumps(earlier))
    with pytest.raises(pytest.fail.Exception, match="training started"):
        sd.run_dynamics_protocol(config)  # accepted: it gets as far as training


def test_merge_without_an_earlier_run_is_refused(tiny_file, tmp_path):
    with pytest.raises(ValueError, match=r"no earlier run at .*dynamics_tiny\.json"):
        sd.run_dynamics_protocol(_config(tiny_file, tmp_path, dynamics_merge=True))


def tiny_file_of(result: dict) -> str:
    return result["config"]["data"]
