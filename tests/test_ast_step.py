"""The jitted distillation step, perplexity, and the data pipeline it consumes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _oracles import np_mask

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
from ast_jax.sparsify import compute_masks, sparse_paths
from ast_jax.step import evaluate_perplexity, final_params, init_train_state, make_train_step

SEQ = 16
# Compilation dominates these tiny runs on CPU; XLA's lowest backend optimisation level halves it.
FAST = {"xla_backend_optimization_level": 0}


def _kernels(tree):
    """``{path: array}`` of the model's sparse kernels in a params-shaped tree (masks or params)."""
    flat = dict(jax.tree_util.tree_flatten_with_path(tree)[0])
    return {
        jax.tree_util.keystr(k): np.asarray(v) for k, v in flat.items() if "kernel" in jax.tree_util.keystr(k)
    }


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
    slorb = slorb_init_tree(teacher, compute_masks(teacher), k=4)
    state0 = init_train_state(teacher, tx, slorb_params=slorb)
    step = jax.jit(make_train_step(model, teacher, tx, LossConfig()), compiler_options=FAST)
    return model, teacher, tx, state0, step


def _run(step, state, data, n, keep_states=False):
    it = BatchIterator(data.train, 4, SEQ, seed=1, position=int(state.data_position))
    mets, states = [], []
    for _ in range(n):
        state, met = step(state, next(it))
        mets.append(met)
        if keep_states:
            states.append(state)
    return (states if keep_states else state), mets


def test_ast_step_is_deterministic_resumable_and_refreshes_from_the_weights(setup, data):
    _, teacher, _, state0, step = setup
    states, mets = _run(step, state0, data, 12, keep_states=True)
    s12 = states[-1]
    s2, _ = _run(step, state0, data, 12)
    chex.assert_trees_all_equal(s12, s2)  # same state + same data position -> bitwise the same run
    assert int(s12.step) == 12 and int(s12.data_position) == 12
    assert [int(m["refreshes"]) for m in mets] == [0] * 4 + [1] * 5 + [2] * 3
    assert all(bool(m["finite"]) for m in mets)
    # Resuming from the middle (state + data position) continues the same run.
    resumed, _ = _run(step, states[6], data, 5)
    chex.assert_trees_all_equal(resumed, s12)
    # The masks of a refresh are the 2:4 magnitude masks of the dense weights that step wrote (NumPy loop),
    # and they stay until the next refresh; they changed since the teacher's.
    masks0 = _kernels(get_masks(state0.opt_state)["model"])
    for refreshed, later in ((states[4], states[8]), (states[9], states[11])):
        masks = _kernels(get_masks(refreshed.opt_state)["model"])
        dense = _kernels(refreshed.params["model"])
        assert len(masks) == 6 and set(masks) <= set(dense)
        for name, mk in masks.items():
            np.testing.assert_array_equal(mk, np_mask(dense[name]), err_msg=name)
        chex.assert_trees_all_equal(get_masks(later.opt_state), get_masks(refreshed.opt_state))
    assert any(not np.array_equal(masks[k], masks0[k]) for k in masks)
    # final_params: the dense weights where the mask keeps them, exactly zero elsewhere; SLoRB untouched.
    model_params, slorb = final_params(s12)
    dense, hard = _kernels(s12.params["model"]), _kernels(model_params)
    for name, mk in _kernels(get_masks(s12.opt_state)["model"]).items():
        np.testing.assert_array_equal(hard[name], np.where(mk, dense[name], 0.0), err_msg=name)
    chex.assert_trees_all_equal(slorb, s12.params["slorb"])
    assert set(slorb) == {"block_0"} and len(sparse_paths(model_params)) == 6
    fc = ("block_0", "mlp", "fc", "kernel")
    before, after = teacher, s12.params["model"]
    for c in fc:
        before, after = before[c], after[c]
    assert not np.array_equal(np.asarray(before), np.asarray(after))


def test_gmp_through_the_step_prunes_gradually_and_donates_the_fresh_state(setup, data):
    """GMP is a schedule of the same optimizer state: masks start dense, each refresh keeps the scheduled
    count among the entries still kept (by magnitude of the weights written), pruned weights are frozen.
    The fresh state is donated as it comes from init_train_state; the teacher survives."""
    model, teacher, _, _, _ = setup
    tx = sparse_adamw(3e-3, variant="gmp", ramp_steps=6, mask_every=2, weight_decay=0.1)
    state = init_train_state(teacher, tx)
    step = jax.jit(make_train_step(model, teacher, tx, LossConfig()), donate_argnums=0, compiler_options=FAST)
    it = BatchIterator(data.train, 4, SEQ, seed=1)
    keeps, hist = [], []
    for _ in range(8):
        state, met = step(state, next(it))
        keeps.append(int(met["keep"]))
        hist.append(
            jax.tree_util.tree_map(np.asarray, (state.params["model"], get_masks(state.opt_state)["model"]))
        )
    assert keeps == [3, 3, 2, 2, 2, 2, 2, 2]
    assert float(np.abs(np.asarray(teacher["block_0"]["mlp"]["fc"]["kernel"])).sum()) > 0  # not donated
    (p6, m6), (p8, m8) = hist[5], hist[7]
    dense6, dense8, masks6, masks8 = _kernels(p6), _kernels(p8), _kernels(m6), _kernels(m8)
    for name, mk in masks8.items():
        np.testing.assert_array_equal(mk, np_mask(dense8[name], 2, 4, allowed=masks6[name]), err_msg=name)
        np.testing.assert_array_equal(dense8[name][~masks6[name]], dense6[name][~masks6[name]], err_msg=name)
        assert (mk.reshape(-1, 4, mk.shape[1]).sum(1) == 2).all()


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


def test_dense_step_values_with_the_hidden_loss(setup, data):
    """A dense optimizer (no masks) on a student equal to its teacher: KL and hidden loss are zero, CE is the
    NumPy cross-entropy of the teacher's logits, and the loss is their weighted sum."""
    model, teacher, _, _, _ = setup
    batch = batch_at(data.train, 0, 4, SEQ)
    tx = optax.adamw(1e-3)
    state = init_train_state(teacher, tx)
    assert get_masks(state.opt_state) is None
    cfg = LossConfig(w_kl=0.5, w_ce=0.25, w_hidden=0.1)
    new, met = jax.jit(make_train_step(model, teacher, tx, cfg), compiler_options=FAST)(state, batch)
    assert {"loss", "ce", "kl", "hidden", "grad_norm", "finite"} <= set(met)
    logits = np.asarray(model.apply({"params": teacher}, batch["inputs"]), np.float64)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, batch["targets"][..., None], -1).mean()
    assert float(met["ce"]) == pytest.approx(ce, rel=1e-5)
    assert abs(float(met["kl"])) < 1e-6 and abs(float(met["hidden"])) < 1e-6
    assert float(met["loss"]) == pytest.approx(0.25 * ce, rel=1e-5, abs=1e-6)
    assert float(met["grad_norm"]) > 0 and int(new.step) == 1
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
