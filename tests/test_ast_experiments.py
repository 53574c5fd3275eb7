"""Pieces of ``ast_jax.experiments`` that run without the real model: the evaluation windows, the variant
selection, and gradual magnitude pruning and the dense controls through the loop on a tiny LLaMA."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ast_jax.config import OptimizerConfig, SparsityConfig
from ast_jax.distill import LossConfig
from ast_jax.experiments import ExperimentConfig, eval_windows
from ast_jax.loop import retrain
from ast_jax.models.llama import Llama, LlamaConfig
from ast_jax.sparsify import is_strict_nm


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


def _tiny_llama():
    cfg = LlamaConfig.tiny(n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32, vocab_size=32)
    model = Llama(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, cfg.vocab_size)
    teacher = jax.jit(lambda t: model.init(jax.random.key(1), t)["params"])(tokens)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    return model, teacher, batch


def test_gmp_prunes_gradually_to_strict_nm():
    """``gmp`` retrains through the loop with ``sparse_adamw(variant="gmp")``: the keep count falls on the
    cubic schedule over 6 updates (applied at the refreshes, every 2 updates), and the result is strict 2:4
    with the pruned weights exactly zero."""
    model, teacher, batch = _tiny_llama()
    sparsity = SparsityConfig(mask_every=2, ramp_steps=6)
    out = retrain(
        model, teacher, teacher, lambda i: batch, optimizer=OptimizerConfig(lr=1e-3), sparsity=sparsity,
        steps=8, variant="gmp", loss=LossConfig(), log_every=4,
    )  # fmt: skip
    # the scheduled keep count after step t: gmp_keep(t) = 4 - round(2·(1 - (1 - t/6)³))
    assert out.report["history"]["decay"] == [3, 3, 2, 2, 2, 2, 2, 2]
    kernel = np.asarray(out.masks["layers_0"]["mlp"]["up_proj"]["kernel"])
    assert (kernel.reshape(4, 4, -1).sum(1) == 2).all()
    assert is_strict_nm(out.params, 2, 4, masks=out.masks) and out.report["strict_nm"]
    assert np.isnan(out.report["flip_rate_last_refresh"])
    assert all(np.isfinite(out.report["history"]["loss"]))


def test_dense_control_trains_without_masks():
    """The ``dense_ce``/``dense_kl`` controls run the same loop with plain AdamW: no masks, nothing pruned,
    the weights still train."""
    assert ExperimentConfig.from_flags(variants="control").variant_list() == ("dense_ce", "dense_kl")
    assert "dense_ce" not in ExperimentConfig().variant_list()
    model, teacher, batch = _tiny_llama()
    out = retrain(
        model, teacher, teacher, lambda i: batch, optimizer=OptimizerConfig(lr=1e-2, warmup_steps=0),
        sparsity=SparsityConfig(), steps=4, variant="dense", loss=LossConfig(w_kl=0.0, w_ce=1.0),
    )  # fmt: skip
    assert out.masks is None and not out.report["strict_nm"]
    w0 = np.asarray(teacher["layers_0"]["mlp"]["up_proj"]["kernel"])
    w1 = np.asarray(out.params["layers_0"]["mlp"]["up_proj"]["kernel"])
    assert np.count_nonzero(w1) == np.count_nonzero(w0) and not np.allclose(w0, w1, atol=1e-7)
    losses = out.report["history"]["loss"]
    assert losses[-1] < losses[0]
    assert out.report["params_nonzero"] == sum(x.size for x in jax.tree.leaves(teacher))
