"""sparse_adamw vs an independent NumPy implementation of AST.md; λ(t); mask refresh; optax composition."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ast_jax.optim import (
    annealing_decay,
    get_masks,
    get_sparse_state,
    gpt2_recipe_schedule,
    mask_stats,
    sparse_adamw,
)

# Compilation dominates these tests on CPU; XLA's lowest backend optimisation level roughly halves it.
FAST = {"xla_backend_optimization_level": 0}


def np_mask(w, n=2, m=4):
    """Loop reference: keep the n largest |w| of each group of m rows (stable sort: lower index wins ties)."""
    out = np.zeros(w.shape, bool)
    for c in range(w.shape[1]):
        for g in range(0, w.shape[0], m):
            order = np.argsort(-np.abs(w[g : g + m, c]), kind="stable")
            out[g + order[:n], c] = True
    return out


def np_sparse_adamw(params, grads_seq, *, lr, lam_max, ramp, every, wd, b1, b2, eps, variant):
    """AST.md's equations written out in NumPy for a dict {name: (array, is_sparse)}."""
    p = {k: v.copy() for k, (v, _) in params.items()}
    sparse = {k for k, (_, s) in params.items() if s}
    masks = {k: np_mask(p[k]) for k in sparse}
    init_masks = {k: v.copy() for k, v in masks.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    nu = {k: np.zeros_like(v) for k, v in p.items()}
    log = []
    for t, grads in enumerate(grads_seq, start=1):
        lam = {"annealing": lam_max * min(t / ramp, 1.0), "coupled": lam_max * min(t / ramp, 1.0)}.get(
            variant, 0.0
        )
        if variant == "static":
            lam = lam_max
        for k in p:
            g = grads[k].copy()
            w = p[k]
            is_sp = k in sparse
            if is_sp and variant == "coupled":
                g = g + lam * (1 - masks[k]) * w
            if is_sp and variant == "fixed":
                g = g * masks[k]
            mu[k] = b1 * mu[k] + (1 - b1) * g
            if is_sp and variant in ("annealing", "static"):  # decoupled: v on u = m + λ(1 - M)W
                u = mu[k] + lam * (1 - masks[k]) * w
                nu[k] = b2 * nu[k] + (1 - b2) * u**2
            else:  # plain AdamW
                u = mu[k]
                nu[k] = b2 * nu[k] + (1 - b2) * g**2
            decay = wd if w.ndim >= 2 else 0.0
            upd = -lr * ((u / (1 - b1**t)) / (np.sqrt(nu[k] / (1 - b2**t)) + eps) + decay * w)
            if is_sp and variant == "fixed":
                upd = upd * masks[k]
            p[k] = w + upd
        flips = None
        if variant != "fixed" and t % every == 0:
            new = {k: np_mask(p[k]) for k in sparse}
            flips = (
                sum(int((new[k] != masks[k]).sum()) for k in sparse),
                sum(int((new[k] != init_masks[k]).sum()) for k in sparse),
            )
            masks = new
        log.append((lam, flips))
    return p, masks, log


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "block_0": {"fc": {"kernel": rng.normal(size=(8, 6)).astype(np.float32), "bias": rng.normal(size=6)}},
        "wte": {"embedding": rng.normal(size=(5, 3)).astype(np.float32)},
    }
    params["block_0"]["fc"]["bias"] = params["block_0"]["fc"]["bias"].astype(np.float32)
    grads = [
        jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
        for _ in range(3)
    ]
    return params, grads


def _flat(tree):
    return {
        "k": tree["block_0"]["fc"]["kernel"],
        "b": tree["block_0"]["fc"]["bias"],
        "e": tree["wte"]["embedding"],
    }


@pytest.mark.parametrize("variant", ["annealing", "static", "coupled", "ste", "fixed"])
def test_three_steps_match_numpy_reference(variant):
    params, grads = _problem()
    hp = {"lr": 0.05, "lam_max": 0.5, "ramp": 2, "every": 2, "wd": 0.1, "b1": 0.9, "b2": 0.99, "eps": 1e-8}
    tx = sparse_adamw(
        hp["lr"],
        max_decay=hp["lam_max"],
        ramp_steps=hp["ramp"],
        mask_every=hp["every"],
        weight_decay=hp["wd"],
        b1=hp["b1"],
        b2=hp["b2"],
        eps=hp["eps"],
        variant=variant,
    )
    p = jax.tree_util.tree_map(jnp.asarray, params)
    state = tx.init(p)
    update = jax.jit(tx.update, compiler_options=FAST)
    lams = []
    for g in grads:
        u, state = update(jax.tree_util.tree_map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, u)
        lams.append(float(state.decay))
    flat = _flat(params)
    ref_p, ref_masks, log = np_sparse_adamw(
        {"k": (flat["k"], True), "b": (flat["b"], False), "e": (flat["e"], False)},
        [_flat(g) for g in grads],
        **hp,
        variant=variant,
    )
    got = _flat(p)
    for name in ("k", "b", "e"):
        np.testing.assert_allclose(np.asarray(got[name]), ref_p[name], rtol=2e-5, atol=2e-6, err_msg=name)
    np.testing.assert_array_equal(np.asarray(state.masks["block_0"]["fc"]["kernel"]), ref_masks["k"])
    assert state.masks["wte"]["embedding"] is None
    np.testing.assert_allclose(lams, [lam for lam, _ in log], rtol=1e-6, atol=1e-9)
    if variant != "fixed":  # refresh after step 2 of 3
        assert int(state.refreshes) == 1
        assert (int(state.flips_prev), int(state.flips_init)) == log[1][1]


def test_decoupled_decay_acts_only_on_masked_weights():
    """With zero gradient and no weight decay, kept weights stay put and masked-out weights shrink."""
    w = jnp.asarray(np.random.default_rng(3).normal(size=(8, 4)), jnp.float32)
    params = {"block_0": {"kernel": w}}
    tx = sparse_adamw(1e-2, max_decay=1.0, ramp_steps=0, mask_every=100, weight_decay=0.0)
    state = tx.init(params)
    u, state = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), state, params)
    mk = np.asarray(state.masks["block_0"]["kernel"])
    du = np.asarray(u["block_0"]["kernel"])
    assert np.all(du[mk] == 0)
    assert np.all(np.sign(du[~mk]) == -np.sign(np.asarray(w)[~mk]))


def test_annealing_decay_values():
    np.testing.assert_allclose(
        np.asarray(annealing_decay(jnp.asarray([0, 50, 100, 250]), 1e-4, 100)),
        [0, 5e-5, 1e-4, 1e-4],
        rtol=1e-6,
        atol=1e-12,
    )
    assert float(annealing_decay(7, 0.3, 0)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="max_decay"):
        annealing_decay(1, -1.0, 10)


def test_masks_refresh_exactly_at_multiples_and_flip_counts():
    rng = np.random.default_rng(5)
    params = {"layers_0": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)}}
    tx = sparse_adamw(0.5, max_decay=0.0, ramp_steps=0, mask_every=3, variant="ste", weight_decay=0.0)
    state = tx.init(params)
    update = jax.jit(tx.update, compiler_options=FAST)
    prev_mask = np.asarray(state.masks["layers_0"]["kernel"])
    init_mask = prev_mask.copy()
    for t in range(1, 8):
        g = {"layers_0": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)}}
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        mask = np.asarray(state.masks["layers_0"]["kernel"])
        if t % 3:
            np.testing.assert_array_equal(mask, prev_mask)
        else:
            np.testing.assert_array_equal(mask, np_mask(np.asarray(params["layers_0"]["kernel"])))
            assert int(state.flips_prev) == int((mask != prev_mask).sum()) > 0
            assert int(state.flips_init) == int((mask != init_mask).sum())
        assert int(state.refreshes) == t // 3
        prev_mask = mask
    stats = mask_stats(state)
    assert float(stats["flip_rate_prev"]) == pytest.approx(int(state.flips_prev) / mask.size)


def test_composes_with_chain_inject_hyperparams_and_schedules():
    params, grads = _problem(1)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    sched = optax.linear_schedule(0.1, 0.01, 3)
    kw = {"max_decay": 0.1, "ramp_steps": 2, "mask_every": 2}
    plain = sparse_adamw(sched, **kw)
    chained = optax.chain(optax.clip_by_global_norm(1e9), sparse_adamw(sched, **kw))
    injected = optax.inject_hyperparams(sparse_adamw, static_args=("n", "m", "mask_every", "variant"))(
        learning_rate=sched, **kw
    )
    outs = []
    for tx in (plain, chained, injected):
        p, s = params, tx.init(params)
        update = jax.jit(tx.update, compiler_options=FAST)
        for g in grads:
            u, s = update(jax.tree_util.tree_map(jnp.asarray, g), s, p)
            p = optax.apply_updates(p, u)
        outs.append((p, get_masks(s)))
        assert get_sparse_state(s) is not None
    # The chained clip computes a global norm (a reduction) and XLA may fuse the two programs differently:
    # near-zero weights need an absolute tolerance, not only a relative one.
    chex.assert_trees_all_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    # inject_hyperparams stores b1, b2, eps... as float32 arrays, so (1 - b1) etc. round differently (the
    # decoupled u/sqrt(v) amplifies that slightly where m and λW nearly cancel).
    chex.assert_trees_all_close(outs[0], outs[2], rtol=1e-4, atol=1e-5)
    assert get_masks(optax.adam(1e-3).init(params)) is None


def test_initial_masks_seed_the_state_and_are_validated():
    params, _ = _problem()
    params = jax.tree_util.tree_map(jnp.asarray, params)
    k = params["block_0"]["fc"]["kernel"]
    custom = np.zeros(k.shape, bool)
    custom[0::2] = True  # keeps rows 0 and 2 of every group of 4
    masks = {"block_0": {"fc": {"kernel": jnp.asarray(custom), "bias": None}}, "wte": {"embedding": None}}
    state = sparse_adamw(1e-3, initial_masks=masks, variant="fixed").init(params)
    np.testing.assert_array_equal(np.asarray(state.masks["block_0"]["fc"]["kernel"]), custom)
    bad = {"block_0": {"fc": {"kernel": jnp.ones((4, 6), bool), "bias": None}}, "wte": {"embedding": None}}
    with pytest.raises(ValueError, match="block_0/fc/kernel"):
        sparse_adamw(1e-3, initial_masks=bad).init(params)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "magic"}, "variant"),
        ({"mask_every": 0}, "mask_every"),
        ({"n": 4, "m": 4}, "0 < n < m"),
        ({"learning_rate": -1e-3}, "learning_rate must be a finite number >= 0"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"max_decay": float("inf")}, "max_decay"),
        ({"ramp_steps": -1}, "ramp_steps"),
        ({"b2": float("nan")}, "b2"),
    ],
)
def test_bad_settings(kwargs, match):
    kwargs = {"learning_rate": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=match):
        sparse_adamw(**kwargs)


def test_gpt2_recipe_schedule():
    f = gpt2_recipe_schedule()
    assert float(f(0)) == 0.0
    assert float(f(1000)) == pytest.approx(1e-4, rel=1e-5)
    assert float(f(2000)) == pytest.approx(2e-4, rel=1e-5)
    mid = 2e-5 + 0.5 * (2e-4 - 2e-5) * (1 + np.cos(np.pi * 0.5))
    assert float(f(20000)) == pytest.approx(mid, rel=1e-4)
    assert float(f(38000)) == pytest.approx(2e-5, rel=1e-4)
    assert float(f(39000)) == pytest.approx(1e-5, rel=1e-4)
    assert float(f(40000)) == pytest.approx(0.0, abs=1e-12)
