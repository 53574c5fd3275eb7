"""One-shot N:M pruning: magnitude, Wanda, SparseGPT (layer level against NumPy references; model level)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ast_jax.masks import nm_mask
from ast_jax.models.gpt2 import GPT2, GPT2Config
from ast_jax.models.llama import Llama, LlamaConfig
from ast_jax.oneshot import (
    OneShotConfig,
    accumulate_stats,
    gpt2_blockwise,
    init_stats,
    llama_blockwise,
    magnitude_prune,
    prune_model,
    reconstruction_error,
    sparsegpt_prune,
    wanda_prune,
)


def _numpy_sparsegpt(
    w: np.ndarray, h: np.ndarray, n: int, m: int, damp: float
) -> tuple[np.ndarray, np.ndarray]:
    """Unblocked reference in float64: visit input rows in order, OBS update of all later rows at once."""
    w = w.astype(np.float64).T.copy()  # (out, in)
    h = h.astype(np.float64).copy()
    d = h.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(d)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, H⁻¹ = UᵀU
    keep = np.zeros_like(w, dtype=bool)
    for i in range(d):
        if i % m == 0:
            s = w[:, i : i + m] ** 2 / np.diag(u)[i : i + m] ** 2
            # n largest per row, lower index first among equals (stable sort of -s)
            order = np.argsort(-s, axis=1, kind="stable")[:, :n]
            np.put_along_axis(keep[:, i : i + m], order, True, axis=1)
        q = np.where(keep[:, i], w[:, i], 0.0)
        err = (w[:, i] - q) / u[i, i]
        w[:, i:] -= np.outer(err, u[i, i:])
        w[:, i] = q
    return w.T, keep.T


def _correlated_layer(seed: int, d_in: int = 128, d_out: int = 48, n_samples: int = 1024):
    """Random layer and calibration inputs: correlated features with log-uniform scales over [0.1, 10]."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d_in, d_out)).astype(np.float32)
    mix = rng.normal(size=(d_in, d_in)) / np.sqrt(d_in) + np.eye(d_in)  # strong correlations
    scales = 10.0 ** rng.uniform(-1.0, 1.0, size=d_in)  # two orders of magnitude
    x = (rng.normal(size=(n_samples, d_in)) @ mix.T) * scales
    return w, x.astype(np.float32)


def _strict_nm(w_hat: np.ndarray, mask: np.ndarray, n: int, m: int) -> bool:
    groups = mask.reshape(mask.shape[0] // m, m, -1).sum(axis=1)
    return bool(np.all(groups == n)) and bool(np.all(w_hat[~mask] == 0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparsegpt_beats_wanda_beats_magnitude_on_correlated_inputs(seed):
    w, x = _correlated_layer(seed)
    hess = x.astype(np.float64).T @ x.astype(np.float64)
    norms = np.sqrt((x.astype(np.float64) ** 2).sum(0))
    results = {
        "magnitude": magnitude_prune(jnp.asarray(w), 2, 4),
        "wanda": wanda_prune(jnp.asarray(w), jnp.asarray(norms, jnp.float32), 2, 4),
        "sparsegpt": sparsegpt_prune(jnp.asarray(w), jnp.asarray(hess, jnp.float32), 2, 4),
    }
    errors = {}
    for name, (w_hat, mask) in results.items():
        w_hat, mask = np.asarray(w_hat), np.asarray(mask)
        assert _strict_nm(w_hat, mask, 2, 4), name
        errors[name] = float(np.sum((x.astype(np.float64) @ (w - w_hat)) ** 2))  # ||XW − XŴ||²
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
    # the closed form used in reports agrees with the direct computation
    rec = float(reconstruction_error(jnp.asarray(w), results["sparsegpt"][0], jnp.asarray(hess, jnp.float32)))
    np.testing.assert_allclose(rec, errors["sparsegpt"], rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize(
    ("n", "m", "d_in", "blocksize"),
    [(2, 4, 40, 16), (4, 8, 48, 16)],  # padding, several blocks, 4:8
)
def test_sparsegpt_matches_unblocked_numpy_reference(n, m, d_in, blocksize):
    rng = np.random.default_rng(d_in + n)
    w = rng.normal(size=(d_in, 12)).astype(np.float32)
    x = rng.normal(size=(256, d_in)) @ (rng.normal(size=(d_in, d_in)) / np.sqrt(d_in) + np.eye(d_in))
    x[:, 3] = 0.0  # a dead input feature: pruned to zero, H_33 replaced by 1
    hess = (x.T @ x).astype(np.float32)
    w_hat, mask = sparsegpt_prune(jnp.asarray(w), jnp.asarray(hess), n, m, blocksize=blocksize, damp=0.01)
    ref_w, ref_mask = _numpy_sparsegpt(w, hess, n, m, 0.01)
    np.testing.assert_array_equal(np.asarray(mask), ref_mask)
    np.testing.assert_allclose(np.asarray(w_hat), ref_w, rtol=2e-3, atol=2e-4)
    assert np.all(np.asarray(w_hat)[3] == 0.0)


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning():
    # H = I: no correlations, equal scales -> OBS saliency is w², no compensation between inputs.
    w = jnp.asarray(np.random.default_rng(3).normal(size=(32, 32)), jnp.float32)
    w_hat, mask = sparsegpt_prune(w, jnp.eye(32), 2, 4)
    w_mag, mask_mag = magnitude_prune(w, 2, 4)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(mask_mag))
    np.testing.assert_allclose(np.asarray(w_hat), np.asarray(w_mag), rtol=1e-6, atol=1e-6)


def test_layer_pruners_validate_inputs():
    with pytest.raises(ValueError, match="multiple of m=4"):
        magnitude_prune(jnp.ones((6, 4)), 2, 4)
    with pytest.raises(ValueError, match="hessian must have shape"):
        sparsegpt_prune(jnp.ones((8, 4)), jnp.eye(4), 2, 4)
    with pytest.raises(ValueError, match="blocksize"):
        sparsegpt_prune(jnp.ones((8, 4)), jnp.eye(8), 2, 4, blocksize=6)
    with pytest.raises(ValueError, match="method"):
        OneShotConfig(method="obs")


def test_accumulated_stats_equal_full_batch():
    x = np.random.default_rng(4).normal(size=(3, 10, 8)).astype(np.float32)
    stats = init_stats(8, hessian=True)
    for chunk in x:
        stats = accumulate_stats(stats, jnp.asarray(chunk))
    flat = x.reshape(-1, 8).astype(np.float64)
    ref = flat.T @ flat  # off-diagonal sums cancel: absolute floor at float32 rounding of the largest entry
    np.testing.assert_allclose(np.asarray(stats.xtx), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(stats.sq), (flat**2).sum(0), rtol=1e-5, atol=1e-5)
    assert float(stats.count) == 30


@pytest.fixture(scope="module")
def tiny_llama():
    # d_ff = 32 makes q|k|v and gate|up both (32, 64) and o, down both (32, 32): two solver compilations.
    cfg = LlamaConfig.tiny(n_layers=2, d_model=32, d_ff=32, vocab_size=64)
    model = Llama(cfg)
    tokens = jax.random.randint(jax.random.key(1), (12, 16), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.key(0), tokens[:1])["params"]
    return cfg, jax.jit(lambda p, t: model.apply({"params": p}, t)), model, params, tokens


def test_prune_model_masks_are_strict_and_match_layer_rules(tiny_llama):
    from ast_jax.sparsify import collect_input_norms, compute_masks, is_strict_nm, wanda_masks

    cfg, apply, model, params, tokens = tiny_llama
    calib = tokens[:8]
    bw = llama_blockwise(cfg)
    out = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        p, masks, info = prune_model(bw, params, calib, OneShotConfig(method=method, chunk=3))
        assert is_strict_nm(p, 2, 4, masks=masks), method
        # norms, embeddings stay dense and untouched; masks are None there
        assert masks["embed"]["embedding"] is None and masks["final_norm"]["scale"] is None
        np.testing.assert_array_equal(
            np.asarray(p["embed"]["embedding"]), np.asarray(params["embed"]["embedding"])
        )
        out[method] = (p, masks, info)

    # magnitude: the same masks as the generic per-kernel rule
    ref = jax.jit(lambda p: compute_masks(p, 2, 4))(params)  # one compilation instead of many eager ops

    for a, b in zip(
        jax.tree_util.tree_leaves(out["magnitude"][1]), jax.tree_util.tree_leaves(ref), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # wanda: block 0 sees the dense model's inputs, so its masks equal the whole-model calibration rule
    norms = collect_input_norms(model, params, [calib])
    ref = wanda_masks(params, norms, 2, 4)
    for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
        np.testing.assert_array_equal(
            np.asarray(out["wanda"][1]["layers_0"]["attn"][k]["kernel"]),
            np.asarray(ref["layers_0"]["attn"][k]["kernel"]),
        )
    assert set(out["sparsegpt"][2]["rel_error"]) >= {"layers_0/attn/q_proj", "layers_1/mlp/down_proj"}

    # the masks are AST's initial masks as they are
    from ast_jax.optim import get_masks, sparse_adamw

    p_sgpt, m_sgpt, _ = out["sparsegpt"]
    opt_state = sparse_adamw(1e-4, initial_masks={"model": m_sgpt}).init({"model": p_sgpt})
    got = get_masks(opt_state)["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    np.testing.assert_array_equal(
        np.asarray(got), np.asarray(m_sgpt["layers_1"]["mlp"]["down_proj"]["kernel"])
    )

    # SparseGPT reconstructs the dense model's outputs better than magnitude pruning on held-out tokens
    held_out = tokens[8:]
    dense = apply(params, held_out)
    err = {k: float(jnp.mean((apply(v[0], held_out) - dense) ** 2)) for k, v in out.items() if k != "wanda"}
    assert err["sparsegpt"] < err["magnitude"], err


def test_prune_model_rejects_bad_input(tiny_llama):
    cfg, _, _, params, tokens = tiny_llama

    with pytest.raises(ValueError, match=r"calib_tokens must have shape"):
        prune_model(llama_blockwise(cfg), params, tokens[0], OneShotConfig(method="wanda"))
    bad = LlamaConfig.tiny(n_layers=3, d_model=32, d_ff=32, vocab_size=64)

    with pytest.raises(ValueError, match="no block 'layers_2'"):
        prune_model(llama_blockwise(bad), params, tokens, OneShotConfig(method="magnitude"))


def test_nm_selection_of_sparsegpt_uses_obs_saliency():
    # With a diagonal Hessian, saliency w²/[H⁻¹]_jj ∝ w²·(H_jj + λ): a large-scale input keeps a small weight.
    # (32, 32) so that the compiled solver is shared with the other tests; column 0 carries the example.
    w = np.random.default_rng(6).uniform(0.5, 1.0, size=(32, 32)).astype(np.float32)
    w[:4, 0] = [1.0, 0.9, 0.2, 0.1]
    diag = np.ones(32, np.float32)
    diag[2] = 1000.0
    _, mask = sparsegpt_prune(jnp.asarray(w), jnp.diag(jnp.asarray(diag)), 2, 4, damp=0.0)
    np.testing.assert_array_equal(np.asarray(mask)[:4, 0], [True, False, True, False])
    assert bool(nm_mask(jnp.asarray(w), 2, 4)[1, 0])  # magnitude alone would keep row 1


# The kernels the one-shot pruner selected before it used the sparsify filter (its own "every 2-D Dense
# kernel of a block" rule, intersected with the filter), recorded from that code for these two tiny models.
SELECTED_BEFORE = {
    "llama": [
        f"layers_{i}/{m}/kernel"
        for i in range(2)
        for m in (
            "attn/k_proj", "attn/o_proj", "attn/q_proj", "attn/v_proj",
            "mlp/down_proj", "mlp/gate_proj", "mlp/up_proj",
        )
    ],
    "gpt2": [
        f"block_{i}/{m}/kernel"
        for i in range(2)
        for m in ("attn/k", "attn/proj", "attn/q", "attn/v", "mlp/fc", "mlp/proj")
    ],
}  # fmt: skip


def test_prune_model_selects_the_kernels_of_the_sparsify_filter():
    """One selection rule: `prune_model` prunes exactly `sparsify.sparse_paths` (the kernels AST training
    masks), the same layers as before for GPT-2 and LLaMA, and follows a custom filter."""
    from ast_jax.sparsify import path_str, sparse_paths

    tokens = jnp.zeros((1, 8), jnp.int32)
    lcfg = LlamaConfig.tiny(n_layers=2, d_model=32, d_ff=32, vocab_size=64)
    gcfg = GPT2Config(vocab_size=64, max_len=16, n_layer=2, n_head=2, d_model=32)
    models = {
        "llama": (llama_blockwise(lcfg), Llama(lcfg).init(jax.random.key(0), tokens)["params"]),
        "gpt2": (gpt2_blockwise(gcfg), GPT2(gcfg).init(jax.random.key(0), tokens)["params"]),
    }
    for name, (bw, params) in models.items():
        _, masks, _ = prune_model(bw, params, None, OneShotConfig(method="magnitude"))
        selected = [path_str(p) for p in sparse_paths(masks, lambda p, x: x is not None)]
        assert selected == SELECTED_BEFORE[name], name
        assert selected == [path_str(p) for p in sparse_paths(params)], name
        # a custom filter: the MLP kernels only
        mlp_only = lambda p, x: "mlp" in p and p[-1] == "kernel" and x.ndim == 2
        _, masks, _ = prune_model(bw, params, None, OneShotConfig(method="magnitude"), sparse_filter=mlp_only)
        selected = [path_str(p) for p in sparse_paths(masks, lambda p, x: x is not None)]
        assert selected == [s for s in SELECTED_BEFORE[name] if "/mlp/" in s], name
