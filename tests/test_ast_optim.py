"""ast_jax.optim, ast_jax.mask_state and ast_jax.srste: sparse_adamw and its pieces vs an independent NumPy
restatement of docs/maths-ast.md (section 4); λ(t); the GMP keep schedule; mask refresh from the weights
actually applied; optax composition; buffers the state owns."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _oracles import np_mask

from ast_jax.optim import (
    annealing_decay,
    decay_mask,
    dense_adamw,
    get_masks,
    get_sparse_state,
    gmp_keep,
    gpt2_recipe_schedule,
    mask_stats,
    refresh_masks,
    sparse_adamw,
    with_nm_masks,
)
from ast_jax.srste import annealing_schedule, mask_updates, scale_by_srste_adam

# Compilation dominates these tests on CPU; XLA's lowest backend optimisation level roughly halves it.
FAST = {"xla_backend_optimization_level": 0}


def np_gmp_keep(t, n, m, ramp):
    return m - int(np.round((m - n) * (1 - (1 - min(t / max(ramp, 1), 1.0)) ** 3)))


def np_sparse_adamw(params, grads_seq, *, lr, lam_max, ramp, every, wd, b1, b2, eps, variant, n=2, m=4):
    """The equations of docs/maths-ast.md (section 4) written out in NumPy for a dict {name: (array,
    is_sparse)}; masks refreshed from the weights after the update every ``every`` steps (GMP: the
    scheduled count among those still kept)."""
    p = {k: v.copy() for k, (v, _) in params.items()}
    sparse = {k for k, (_, s) in params.items() if s}
    if variant == "gmp":
        masks = {k: np.ones(p[k].shape, bool) for k in sparse}
    else:
        masks = {k: np_mask(p[k], n, m) for k in sparse}
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
        frozen = variant in ("fixed", "gmp")
        for k in p:
            g = grads[k].copy()
            w = p[k]
            is_sp = k in sparse
            if is_sp and variant == "coupled":
                g = g + lam * (1 - masks[k]) * w
            if is_sp and frozen:
                g = g * masks[k]
            mu[k] = b1 * mu[k] + (1 - b1) * g
            if is_sp and variant in ("annealing", "static"):  # decoupled: v on u = m + λ(1 - M)W
                u = mu[k] + lam * (1 - masks[k]) * w
                nu[k] = b2 * nu[k] + (1 - b2) * u**2
            else:  # plain AdamW
                u = mu[k]
                nu[k] = b2 * nu[k] + (1 - b2) * g**2
            decay = wd if w.ndim >= 2 else 0.0  # matrices only, in every variant (GMP included)
            upd = -lr * ((u / (1 - b1**t)) / (np.sqrt(nu[k] / (1 - b2**t)) + eps) + decay * w)
            if is_sp and frozen:
                upd = upd * masks[k]
            p[k] = w + upd
        flips = None
        if variant != "fixed" and t % every == 0:
            if variant == "gmp":
                keep = np_gmp_keep(t, n, m, ramp)
                new = {k: np_mask(p[k], keep, m, allowed=masks[k]) for k in sparse}
            else:
                new = {k: np_mask(p[k], n, m) for k in sparse}
            flips = (
                sum(int((new[k] != masks[k]).sum()) for k in sparse),
                sum(int((new[k] != init_masks[k]).sum()) for k in sparse),
            )
            masks = new
        log.append((lam, flips))
    return p, masks, log


def _problem(seed=0, steps=4):
    rng = np.random.default_rng(seed)
    params = {
        "block_0": {"fc": {"kernel": rng.normal(size=(8, 6)).astype(np.float32), "bias": rng.normal(size=6)}},
        "wte": {"embedding": rng.normal(size=(5, 3)).astype(np.float32)},
    }
    params["block_0"]["fc"]["bias"] = params["block_0"]["fc"]["bias"].astype(np.float32)
    grads = [
        jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
        for _ in range(steps)
    ]
    return params, grads


def _flat(tree):
    return {
        "k": tree["block_0"]["fc"]["kernel"],
        "b": tree["block_0"]["fc"]["bias"],
        "e": tree["wte"]["embedding"],
    }


def _stepper(tx):
    """One training-loop step as make_train_step does it: update, apply, refresh from the applied weights."""

    def step(params, state, grads):
        u, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, u)
        return params, refresh_masks(state, params)

    return jax.jit(step, compiler_options=FAST)


def _run(tx, params, grads):
    p = jax.tree_util.tree_map(jnp.asarray, params)
    state = tx.init(p)
    step = _stepper(tx)
    stats = []
    for g in grads:
        p, state = step(p, state, jax.tree_util.tree_map(jnp.asarray, g))
        stats.append(mask_stats(state))
    return p, state, stats


@pytest.mark.parametrize("variant", ["annealing", "static", "coupled", "ste", "fixed", "gmp"])
def test_four_steps_match_numpy_reference(variant):
    params, grads = _problem()
    hp = {"lr": 0.05, "lam_max": 0.5, "ramp": 2, "every": 2, "wd": 0.1, "b1": 0.9, "b2": 0.99, "eps": 1e-8}
    if variant == "gmp":
        hp["ramp"] = 8  # keep 3 of 4 after step 2, 2 of 4 after step 4
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
    p, state, stats = _run(tx, params, grads)
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
    masks = get_masks(state)
    np.testing.assert_array_equal(np.asarray(masks["block_0"]["fc"]["kernel"]), ref_masks["k"])
    assert masks["wte"]["embedding"] is None and masks["block_0"]["fc"]["bias"] is None
    np.testing.assert_allclose(
        [float(s["decay"]) for s in stats], [lam for lam, _ in log], rtol=1e-6, atol=1e-9
    )
    sst = get_sparse_state(state)
    if variant == "fixed":
        assert int(sst.refreshes) == 0
    else:  # refreshes after steps 2 and 4
        assert int(sst.refreshes) == 2
        assert (int(sst.flips_prev), int(sst.flips_init)) == log[3][1]
    if variant == "gmp":
        assert (
            [int(s["keep"]) for s in stats] == [np_gmp_keep(t, 2, 4, 8) for t in (1, 2, 3, 4)] == [3, 3, 2, 2]
        )
        assert log[1][1][0] == 6 * 2  # step 2 pruned one entry per group (2 groups x 6 columns)
    else:
        assert "keep" not in stats[-1]


def test_decoupled_decay_acts_only_on_masked_weights():
    """With zero gradient and no weight decay, kept weights stay put and masked-out weights shrink."""
    w = jnp.asarray(np.random.default_rng(3).normal(size=(8, 4)), jnp.float32)
    params = {"block_0": {"kernel": w}}
    tx = sparse_adamw(1e-2, max_decay=1.0, ramp_steps=0, mask_every=100, weight_decay=0.0)
    state = tx.init(params)
    u, state = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), state, params)
    mk = np.asarray(get_masks(state)["block_0"]["kernel"])
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
    # optax schedules see the 0-based count: update c decays with λ(c + 1)
    assert float(annealing_schedule(1e-4, 100)(jnp.int32(49))) == pytest.approx(5e-5)
    with pytest.raises(ValueError, match="max_decay"):
        annealing_decay(1, -1.0, 10)


def test_gmp_keep_schedule_is_cubic_from_m_to_n():
    got = [int(gmp_keep(c, 2, 4, 100)) for c in (0, 10, 20, 50, 100, 1000)]
    # m - round((m - n)(1 - (1 - c/R)^3)): 2(1 - 0.9^3) = 0.54 -> 1 pruned at c = 10
    assert got == [4, 3, 3, 2, 2, 2]
    assert [int(gmp_keep(c, 1, 8, 10)) for c in (0, 1, 3, 10)] == [8, 6, 3, 1]
    assert [int(gmp_keep(c, 2, 4, 0)) for c in (0, 1)] == [4, 2]  # no ramp: pruned at the first update


def test_masks_refresh_exactly_at_multiples_and_flip_counts():
    rng = np.random.default_rng(5)
    params = {"layers_0": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)}}
    tx = sparse_adamw(0.5, max_decay=0.0, ramp_steps=0, mask_every=3, variant="ste", weight_decay=0.0)
    state = tx.init(params)
    step = _stepper(tx)
    prev_mask = np.asarray(get_masks(state)["layers_0"]["kernel"])
    init_mask = prev_mask.copy()
    for t in range(1, 8):
        g = {"layers_0": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)}}
        params, state = step(params, state, g)
        sst = get_sparse_state(state)
        mask = np.asarray(sst.masks["layers_0"]["kernel"])
        if t % 3:
            np.testing.assert_array_equal(mask, prev_mask)
        else:
            np.testing.assert_array_equal(mask, np_mask(np.asarray(params["layers_0"]["kernel"])))
            assert int(sst.flips_prev) == int((mask != prev_mask).sum()) > 0
            assert int(sst.flips_init) == int((mask != init_mask).sum())
        assert int(sst.refreshes) == t // 3 and not bool(sst.refresh_due)
        prev_mask = mask
    stats = mask_stats(state)
    assert float(stats["flip_rate_prev"]) == pytest.approx(int(sst.flips_prev) / mask.size)


def test_masks_agree_with_the_weights_actually_applied():
    """A transform chained after the sparse pieces changes the applied update; the refreshed masks are those
    of the weights written, not of the update the sparse pieces proposed (the one-piece design refreshed
    from ``w + its own update`` and disagreed here)."""
    params, grads = _problem(2, steps=3)
    tx = optax.chain(sparse_adamw(0.5, mask_every=1, max_decay=0.0, variant="ste"), optax.scale(0.5))
    p = jax.tree_util.tree_map(jnp.asarray, params)
    state = tx.init(p)
    step = _stepper(tx)
    for g in grads:
        p, state = step(p, state, jax.tree_util.tree_map(jnp.asarray, g))
        applied = np.asarray(p["block_0"]["fc"]["kernel"])
        np.testing.assert_array_equal(
            np.asarray(get_masks(state)["block_0"]["fc"]["kernel"]), np_mask(applied)
        )
    assert int(get_sparse_state(state).flips_init) > 0  # the masks did move


def test_refresh_masks_is_a_pure_post_update_step():
    params, grads = _problem(3, steps=2)
    p = jax.tree_util.tree_map(jnp.asarray, params)
    tx = sparse_adamw(0.5, mask_every=2, max_decay=0.0, variant="ste")
    s = tx.init(p)
    for g in grads:
        u, s = tx.update(jax.tree_util.tree_map(jnp.asarray, g), s, p)
        p = optax.apply_updates(p, u)
    # update only marks the refresh; the masks are still the initial ones until refresh_masks runs
    assert bool(s.refresh_due) and int(s.refreshes) == 0
    chex.assert_trees_all_equal(s.masks, s.init_masks)
    once = refresh_masks(s, p)
    assert not bool(once.refresh_due) and int(once.refreshes) == 1
    np.testing.assert_array_equal(
        np.asarray(once.masks["block_0"]["fc"]["kernel"]), np_mask(np.asarray(p["block_0"]["fc"]["kernel"]))
    )
    chex.assert_trees_all_equal(refresh_masks(once, p), once)  # a second call changes nothing
    dense = optax.adam(1e-3).init(p)
    chex.assert_trees_all_equal(refresh_masks(dense, p), dense)
    assert get_masks(dense) is None and mask_stats(dense) == {}


def test_composes_with_chain_inject_hyperparams_and_schedules():
    params, grads = _problem(1, steps=3)
    sched = optax.linear_schedule(0.1, 0.01, 3)
    kw = {"max_decay": 0.1, "ramp_steps": 2, "mask_every": 2}
    plain = sparse_adamw(sched, **kw)
    chained = optax.chain(optax.clip_by_global_norm(1e9), sparse_adamw(sched, **kw))
    injected = optax.inject_hyperparams(sparse_adamw, static_args=("n", "m", "mask_every", "variant"))(
        learning_rate=sched, **kw
    )
    outs = []
    for tx in (plain, chained, injected):
        p, s, _ = _run(tx, params, grads)
        outs.append((p, get_masks(s)))
        assert int(get_sparse_state(s).refreshes) == 1
    # The chained clip computes a global norm (a reduction) and XLA may fuse the two programs differently:
    # near-zero weights need an absolute tolerance, not only a relative one.
    chex.assert_trees_all_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    # inject_hyperparams stores b1, b2, eps... as float32 arrays, so (1 - b1) etc. round differently (the
    # decoupled u/sqrt(v) amplifies that slightly where m and λW nearly cancel).
    chex.assert_trees_all_close(outs[0], outs[2], rtol=1e-4, atol=1e-5)
    # A real clip changes the numbers and still refreshes from the weights it produced.
    clipped = optax.chain(optax.clip_by_global_norm(0.1), sparse_adamw(sched, **kw))
    p, s, _ = _run(clipped, params, grads)
    np.testing.assert_array_equal(
        np.asarray(get_masks(s)["block_0"]["fc"]["kernel"]), np_mask(np.asarray(p["block_0"]["fc"]["kernel"]))
    )


def test_the_pieces_chained_by_hand_are_sparse_adamw():
    params, grads = _problem(4, steps=3)
    sched = optax.linear_schedule(0.1, 0.01, 3)
    by_hand = with_nm_masks(
        optax.chain(
            scale_by_srste_adam(annealing_schedule(0.3, 2), b1=0.9, b2=0.99),
            optax.add_decayed_weights(0.1, mask=decay_mask()),
            optax.scale_by_learning_rate(sched),
        ),
        n=2,
        m=4,
        refresh_every=2,
    )
    one_line = sparse_adamw(sched, max_decay=0.3, ramp_steps=2, mask_every=2, b2=0.99, weight_decay=0.1)
    a, sa, _ = _run(by_hand, params, grads)
    b, sb, _ = _run(one_line, params, grads)
    chex.assert_trees_all_equal((a, sa), (b, sb))
    # the mask-reading pieces refuse to run without the wrapper's masks
    p = jax.tree_util.tree_map(jnp.asarray, params)
    with pytest.raises(ValueError, match="with_nm_masks"):
        scale_by_srste_adam(0.1).update(p, scale_by_srste_adam(0.1).init(p), p)
    with pytest.raises(ValueError, match="with_nm_masks"):
        mask_updates().update(p, optax.EmptyState(), p)


@pytest.mark.parametrize("variant", ["annealing", "gmp", "dense"])
def test_weight_decay_spares_biases_and_norms(variant):
    """Zero gradient: biases (1-D) do not move; matrices, the embedding included, shrink by lr·wd·W."""
    params, _ = _problem(6)
    p = jax.tree_util.tree_map(jnp.asarray, params)
    if variant == "dense":
        tx = dense_adamw(0.1, weight_decay=0.5)
    else:
        tx = sparse_adamw(0.1, weight_decay=0.5, max_decay=0.0, variant=variant)
    u, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, p), tx.init(p), p)
    np.testing.assert_array_equal(np.asarray(u["block_0"]["fc"]["bias"]), 0.0)
    e = np.asarray(p["wte"]["embedding"])
    np.testing.assert_allclose(np.asarray(u["wte"]["embedding"]), -0.1 * 0.5 * e, rtol=1e-6, atol=1e-8)


def test_dense_adamw_is_optax_adamw_with_the_decay_mask():
    params, grads = _problem(8, steps=3)
    sched = optax.linear_schedule(0.1, 0.01, 3)
    outs = []
    for tx in (dense_adamw(sched, b2=0.99), optax.adamw(sched, b2=0.99, weight_decay=0.1, mask=decay_mask())):
        p = jax.tree_util.tree_map(jnp.asarray, params)
        s = tx.init(p)
        for g in grads:
            u, s = tx.update(jax.tree_util.tree_map(jnp.asarray, g), s, p)
            p = optax.apply_updates(p, u)
        outs.append(p)
    # same equations; optax rounds (1 - b2)·g² in another order
    chex.assert_trees_all_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_init_state_owns_its_buffers_and_can_be_donated():
    params, grads = _problem(7, steps=2)
    p = jax.tree_util.tree_map(jnp.asarray, params)
    k = p["block_0"]["fc"]["kernel"]
    given = np.zeros(k.shape, bool)
    given[1::2] = True
    masks_in = {"block_0": {"fc": {"kernel": jnp.asarray(given), "bias": None}}, "wte": {"embedding": None}}
    for tx in (sparse_adamw(1e-2), sparse_adamw(1e-2, initial_masks=masks_in, variant="fixed")):
        state = tx.init(p)
        ptr = lambda x: x.unsafe_buffer_pointer()
        buffers = [ptr(x) for x in jax.tree_util.tree_leaves(state)]
        assert len(set(buffers)) == len(buffers)  # no two leaves share a buffer (masks vs init_masks)
        assert ptr(masks_in["block_0"]["fc"]["kernel"]) not in buffers
        step = jax.jit(lambda s, g, p=p, tx=tx: tx.update(g, s, p)[1], donate_argnums=0)
        for g in grads:  # donating a fresh state works without copying it first
            state = step(state, jax.tree_util.tree_map(jnp.asarray, g))
    np.testing.assert_array_equal(np.asarray(masks_in["block_0"]["fc"]["kernel"]), given)  # still alive


def test_initial_masks_seed_the_state_and_are_validated():
    params, _ = _problem()
    params = jax.tree_util.tree_map(jnp.asarray, params)
    k = params["block_0"]["fc"]["kernel"]
    custom = np.zeros(k.shape, bool)
    custom[0::2] = True  # keeps rows 0 and 2 of every group of 4
    masks = {"block_0": {"fc": {"kernel": jnp.asarray(custom), "bias": None}}, "wte": {"embedding": None}}
    state = sparse_adamw(1e-3, initial_masks=masks, variant="fixed").init(params)
    np.testing.assert_array_equal(np.asarray(get_masks(state)["block_0"]["fc"]["kernel"]), custom)
    bad = {"block_0": {"fc": {"kernel": jnp.ones((4, 6), bool), "bias": None}}, "wte": {"embedding": None}}
    with pytest.raises(ValueError, match="block_0/fc/kernel"):
        sparse_adamw(1e-3, initial_masks=bad).init(params)
    with pytest.raises(ValueError, match="keep_schedule"):
        sparse_adamw(1e-3, initial_masks=masks, variant="gmp")


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


def test_bad_wrapper_settings():
    with pytest.raises(ValueError, match="refresh_every"):
        with_nm_masks(optax.identity(), refresh_every=0)
    with pytest.raises(ValueError, match="b1"):
        scale_by_srste_adam(0.1, b1=1.0)
    p = {"block_0": {"kernel": jnp.ones((6, 4))}}
    with pytest.raises(ValueError, match="block_0/kernel"):
        with_nm_masks(optax.identity()).init(p)  # input dimension 6 is not a multiple of m=4


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
