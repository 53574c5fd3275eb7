"""The jitted distillation step, perplexity, and the data pipeline it consumes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ast_jax.data import (
    BatchIterator,
    batch_at,
    builtin_corpus,
    decode,
    encode,
    eval_batches,
    load_text_data,
    split_tokens,
)
from ast_jax.distill import LossConfig
from ast_jax.models.gpt2 import GPT2, GPT2Config
from ast_jax.optim import get_masks, sparse_adamw
from ast_jax.slorb import slorb_init_tree
from ast_jax.sparsify import compute_masks, is_strict_nm, sparse_paths
from ast_jax.step import evaluate_perplexity, final_params, init_train_state, make_train_step

SEQ = 16
# Compilation dominates these tiny runs on CPU; XLA's lowest backend optimisation level halves it.
FAST = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def data():
    return load_text_data(max_bytes=40_000)


@pytest.fixture(scope="module")
def setup(data):
    model = GPT2(GPT2Config(n_layer=1, d_model=16, n_head=2, max_len=SEQ))
    teacher = jax.jit(model.init, compiler_options=FAST)(jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))[
        "params"
    ]
    tx = sparse_adamw(3e-3, max_decay=0.1, ramp_steps=5, mask_every=5, weight_decay=0.1)
    slorb = slorb_init_tree({"model": teacher}, compute_masks({"model": teacher}), k=4)["model"]
    state0 = init_train_state(teacher, tx, slorb_params=slorb, seed=3)
    step = jax.jit(make_train_step(model, teacher, tx, LossConfig()), compiler_options=FAST)
    return model, teacher, tx, state0, step


def _run(step, state, data, n):
    it = BatchIterator(data.train, 4, SEQ, seed=1, position=int(state.data_position))
    mets = []
    for _ in range(n):
        state, met = step(state, next(it))
        mets.append(met)
    return state, mets


def test_ast_step_is_deterministic_strict_and_refreshes(setup, data):
    _, teacher, _, state0, step = setup
    s1, mets = _run(step, state0, data, 12)
    s2, _ = _run(step, state0, data, 12)
    chex.assert_trees_all_equal(s1, s2)  # same state + same data position -> bitwise the same run
    assert int(s1.step) == 12 and int(s1.data_position) == 12
    assert [int(m["refreshes"]) for m in mets][4:11:5] == [1, 2]
    assert all(bool(m["finite"]) for m in mets)
    # Resuming from the middle (state + data position) continues the same run.
    mid, _ = _run(step, state0, data, 7)
    resumed, _ = _run(step, mid, data, 5)
    chex.assert_trees_all_equal(resumed, s1)
    # After training: the model's sparse kernels are strictly 2:4 and the masked weights are exactly zero.
    model_params, slorb = final_params(s1)
    masks = get_masks(s1.opt_state)["model"]
    assert is_strict_nm(model_params, 2, 4, masks=masks)
    assert slorb is not None and set(slorb) == {"block_0"}
    assert len(sparse_paths(model_params)) == 6
    fc = ("block_0", "mlp", "fc", "kernel")
    before, after = teacher, s1.params["model"]
    for c in fc:
        before, after = before[c], after[c]
    assert not np.array_equal(np.asarray(before), np.asarray(after))


def test_nonfinite_step_leaves_state_unchanged(setup, data):
    _, _, _, state0, step = setup
    bad_params = jax.tree_util.tree_map(lambda x: x, state0.params)
    bad_params["model"]["ln_f"]["scale"] = bad_params["model"]["ln_f"]["scale"].at[0].set(jnp.nan)
    bad = state0.replace(params=bad_params)
    out, met = step(bad, batch_at(data.train, 0, 4, SEQ, seed=1))
    assert not bool(met["finite"])
    chex.assert_trees_all_equal(out.params, bad.params)
    chex.assert_trees_all_equal(out.opt_state, bad.opt_state)
    assert int(out.step) == 0


def test_dense_step_and_hidden_loss_trace(setup, data):
    model, teacher, _, _, _ = setup
    batch = batch_at(data.train, 0, 4, SEQ)
    tx = optax.adamw(1e-3)
    state = init_train_state(teacher, tx)
    assert get_masks(state.opt_state) is None
    _, met = jax.eval_shape(make_train_step(model, teacher, tx, LossConfig(w_hidden=0.1)), state, batch)
    assert {"loss", "ce", "kl", "hidden", "grad_norm", "finite"} <= set(met)
    with pytest.raises(ValueError, match="needs a teacher"):
        jax.eval_shape(make_train_step(model, None, tx, LossConfig()), state, batch)


def test_evaluate_perplexity_matches_numpy(setup, data):
    model, teacher, _, _, _ = setup
    batches = list(eval_batches(data.heldout, SEQ, 8, max_windows=16))
    assert sum(b["inputs"].shape[0] for b in batches) == 16
    logits = np.concatenate(
        [
            np.asarray(
                jax.jit(model.apply, compiler_options=FAST)({"params": teacher}, b["inputs"]), np.float64
            )
            for b in batches
        ]
    )
    targets = np.concatenate([b["targets"] for b in batches])
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1).mean()
    ppl = evaluate_perplexity(model, teacher, batches, compiler_options=FAST)
    assert ppl == pytest.approx(np.exp(nll), rel=1e-4)


# ---- data --------------------------------------------------------------------------------------------------


def test_builtin_corpus_is_real_text(data):
    text = builtin_corpus(max_bytes=40_000)
    assert len(text.encode()) > 30_000
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(set(lines)) > 0.8 * len(lines)  # not a repeated toy string
    assert decode(encode(text)) == text
    assert data.source == "python-stdlib-docstrings" and data.vocab_size == 256


def test_split_is_deterministic_and_disjoint():
    tokens = np.arange(10_000) % 251
    train, held = split_tokens(tokens.astype(np.uint8), 0.1, 100)
    assert len(train) + len(held) == 10_000 and len(held) == 1_000
    idx = np.arange(10_000)
    held_idx = idx[(idx // 100) % 10 == 9]
    np.testing.assert_array_equal(held, tokens[held_idx].astype(np.uint8))
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_tokens(tokens, 1.5)


def test_batches_depend_only_on_position_and_resume_exactly(data):
    a = batch_at(data.train, 5, 3, SEQ, seed=2)
    b = batch_at(data.train, 5, 3, SEQ, seed=2)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["inputs"][:, 1:], a["targets"][:, :-1])
    assert a["inputs"].dtype == np.int32 and a["inputs"].shape == (3, SEQ)
    it = BatchIterator(data.train, 3, SEQ, seed=2)
    full = [next(it)["inputs"] for _ in range(6)]
    resumed = BatchIterator(data.train, 3, SEQ, seed=2, position=4)
    np.testing.assert_array_equal(next(resumed)["inputs"], full[4])
    with pytest.raises(ValueError, match="fewer than seq_len"):
        batch_at(np.zeros(5, np.uint8), 0, 1, SEQ)


def test_user_text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("héllo wörld. " * 500, encoding="utf-8")
    d = load_text_data(p)
    assert d.source == str(p) and len(d.train) + len(d.heldout) == len(("héllo wörld. " * 500).encode())
    with pytest.raises(ValueError, match="not a file"):
        load_text_data(tmp_path / "missing.txt")
