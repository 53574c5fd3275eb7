"""Pieces of ``ast_jax.experiments`` that run without the real model: the evaluation windows, the variant
selection, and the gradual-magnitude-pruning step on a tiny LLaMA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ast_jax.distill import LossConfig
from ast_jax.experiments import ExperimentConfig, eval_windows
from ast_jax.loop import GMPState, gmp_keep, make_gmp_step
from ast_jax.models.llama import Llama, LlamaConfig
from ast_jax.sparsify import compute_masks, is_strict_nm


def test_eval_windows_protocol():
    ids = np.arange(2100)
    w = eval_windows(ids, 512, 4)
    assert w.shape == (4, 512) and w[1, 0] == 512 and w[3, -1] == 2047  # consecutive, non-overlapping
    assert eval_windows(ids, 512).shape == (4, 512)  # the tail that does not fill a window is dropped
    with pytest.raises(ValueError, match="holds no window"):
        eval_windows(ids[:100], 512)


def test_variant_groups_and_validation():
    cfg = ExperimentConfig.from_flags(variants="oneshot,ast_naive,retrain")
    names = cfg.variant_list()
    assert names[:4] == ("dense", "magnitude", "wanda", "sparsegpt") and names.count("ast_naive") == 1
    assert len(ExperimentConfig().variant_list()) == 13
    with pytest.raises(ValueError, match="unknown variant 'ast_turbo'"):
        ExperimentConfig.from_flags(variants="ast_turbo")
    with pytest.raises(ValueError, match="--dtype"):
        ExperimentConfig.from_flags(dtype="float16")


def test_gmp_keep_schedule_is_cubic_staircase():
    steps = np.arange(0, 121)
    keep = np.asarray(jax.vmap(lambda t: gmp_keep(t, 2, 4, 100))(steps))
    frac = np.minimum(steps / 100, 1.0)
    np.testing.assert_array_equal(keep, 4 - np.round(2 * (1 - (1 - frac) ** 3)).astype(int))
    assert keep[0] == 4 and keep[-1] == 2 and np.all(np.diff(keep) <= 0)


def test_gmp_step_prunes_gradually_to_strict_nm():
    cfg = LlamaConfig.tiny(n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32, vocab_size=32)
    model = Llama(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, cfg.vocab_size)
    tx = optax.adamw(1e-3)

    @jax.jit  # one compilation instead of many eager ops
    def setup(tokens):
        teacher = model.init(jax.random.key(1), tokens)["params"]
        params = {"model": jax.tree_util.tree_map(jnp.copy, teacher)}
        masks = jax.tree_util.tree_map(jnp.ones_like, {"model": compute_masks(teacher, 2, 4)})
        return teacher, GMPState(params, tx.init(params), masks, jnp.zeros((), jnp.int32))

    teacher, state = setup(tokens)

    step = jax.jit(make_gmp_step(model, tx, LossConfig(), 2, 4, ramp_steps=6, every=2))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    kept = []
    for _ in range(8):
        state, met = step(state, batch, teacher)
        k = np.asarray(state.masks["model"]["layers_0"]["mlp"]["up_proj"]["kernel"])
        kept.append(int(k.reshape(4, 4, -1).sum(1).max()))
    # refreshed at steps 1, 2, 4, 6, 8 with keep(t) = 4 - round(2·(1 - (1 - t/6)³)) = 3, 3, 2, 2, 2
    assert kept == [3, 3, 3, 2, 2, 2, 2, 2], kept
    final = state.params["model"]
    assert is_strict_nm(final, 2, 4, masks=state.masks["model"])  # pruned weights are exactly zero
    assert bool(jnp.isfinite(met["loss"]))


def test_dense_control_is_gmp_with_n_equal_m():
    """The ``dense_ce``/``dense_kl`` controls run the GMP step with n = m: nothing is ever pruned, the
    weights still train."""
    assert ExperimentConfig.from_flags(variants="control").variant_list() == ("dense_ce", "dense_kl")
    assert "dense_ce" not in ExperimentConfig().variant_list()
    cfg = LlamaConfig.tiny(n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32, vocab_size=32)
    model = Llama(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, cfg.vocab_size)
    tx = optax.adamw(1e-2)
    teacher = jax.jit(lambda t: model.init(jax.random.key(1), t)["params"])(tokens)
    params = {"model": jax.tree_util.tree_map(jnp.copy, teacher)}
    masks = jax.tree_util.tree_map(jnp.ones_like, {"model": compute_masks(teacher, 2, 4)})
    state = GMPState(params, tx.init(params), masks, jnp.zeros((), jnp.int32))
    step = jax.jit(make_gmp_step(model, tx, LossConfig(w_kl=0.0, w_ce=1.0), 4, 4, ramp_steps=2, every=1))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    losses = []
    for _ in range(4):
        state, met = step(state, batch, teacher)
        losses.append(float(met["loss"]))
    assert all(bool(jnp.all(m)) for m in jax.tree_util.tree_leaves(state.masks))
    w0 = np.asarray(teacher["layers_0"]["mlp"]["up_proj"]["kernel"])
    w1 = np.asarray(state.params["model"]["layers_0"]["mlp"]["up_proj"]["kernel"])
    assert np.count_nonzero(w1) == np.count_nonzero(w0) and not np.allclose(w0, w1)
    assert losses[-1] < losses[0]
