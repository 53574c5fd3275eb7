"""Tests of `lidu_jax.training`, `lidu_jax.models.mf` and the score-distribution sources of
`lidu_jax.distributions` on a tiny synthetic data set."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lidu_jax
from lidu_jax import distributions, training
from lidu_jax.models.mf import BayesianMFConfig, MFConfig, bayesian_mf_moments, make_bayesian_mf, make_bpr_mf
from lidu_jax.synthetic import SyntheticConfig, generate
from lidu_jax.training import bootstrap_weights, fit, score_users

CFG = SyntheticConfig(n_users=40, n_items=30, dim=4, min_activity=4, max_activity=10, true_top=5, seed=3)
EPOCHS = 3
EPS32 = float(np.finfo(np.float32).eps)


def key(seed):
    # rbg keys for the Bayesian model and sampling: the code is PRNG-implementation agnostic, and rbg compiles
    # faster than threefry on CPU. BPR-MF fits use threefry (`tkey`) so that vmapped and single runs agree.
    return jax.random.key(seed, impl="rbg")


def tkey(seed):
    return jax.random.key(seed)


@pytest.fixture(scope="module")
def split():
    return generate(CFG).split


@pytest.fixture(scope="module")
def mf(split):
    return make_bpr_mf(split, MFConfig(dim=4, batch_size=64))


@pytest.fixture(scope="module")
def ensemble(split, mf):
    n_train = split.train_users.size
    keys = jax.random.split(tkey(0), 2)
    return fit(mf, keys, jnp.ones((2, n_train)), EPOCHS, snapshot_epochs=(2, 3), progress=False)


def test_vmapped_fit_equals_separate_runs_and_is_deterministic(split, mf, ensemble):
    n_train = split.train_users.size
    keys = jax.random.split(tkey(0), 2)
    params, snaps = ensemble
    single, _ = fit(mf, keys[1:], jnp.ones((1, n_train)), EPOCHS, progress=False)
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x[1], params), jax.tree.map(lambda x: x[0], single), rtol=1e-4, atol=1e-5
    )
    again, _ = fit(mf, keys, jnp.ones((2, n_train)), EPOCHS, progress=False)
    chex.assert_trees_all_equal(again, params)
    # The last snapshot is the final state (the same arrays, not a recomputation); stacked (S, M, ...).
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[-1], snaps), params)
    assert snaps["user"].shape == (2, 2, split.n_users, 4)


def test_training_lowers_the_loss_and_bootstrap_weights(split, mf):
    n_train = split.train_users.size
    losses = []
    fit(
        mf,
        jax.random.split(tkey(1), 2),
        jnp.ones((2, n_train)),
        6,
        progress=False,
        callback=lambda e, p, loss: losses.append(float(loss[0])),
    )
    assert len(losses) == 6 and losses[-1] < losses[0]
    w = bootstrap_weights(key(2), 3, n_train)
    np.testing.assert_array_equal(np.asarray(w.sum(1)), n_train)
    assert float(w.max()) > 1 and float(w.min()) == 0
    with pytest.raises(ValueError, match="weights"):
        fit(mf, jax.random.split(key(1), 2), jnp.ones((3, n_train)), 1, progress=False)
    with pytest.raises(ValueError, match="snapshot_epochs"):
        fit(mf, jax.random.split(key(1), 1), jnp.ones((1, n_train)), 2, snapshot_epochs=(5,))


def test_ensemble_samples_moments_and_streaming_lidu(split, mf, ensemble):
    params, _ = ensemble
    users = np.arange(split.n_users)
    samples = distributions.stacked_samples(mf, params, users, chunk=16)
    chex.assert_shape(samples, (2, split.n_users, split.n_items))
    direct = jax.vmap(lambda p: mf.score(p, jnp.asarray(users), None))(params)
    chex.assert_trees_all_close(samples, direct, rtol=1e-5, atol=1e-5)
    dist = distributions.from_arrays(samples=samples)
    # float32 moments vs float64 NumPy: where two samples nearly agree the std is a difference of nearly equal
    # numbers, so its error is absolute (a few ulp of the scores), not relative to the tiny std.
    scale = float(np.abs(np.asarray(samples)).max())
    want_std = np.maximum(np.std(np.asarray(samples), 0, ddof=1), 1e-6)
    np.testing.assert_allclose(dist.std, want_std, rtol=1e-4, atol=16 * EPS32 * scale)
    train = split.train_matrix()
    want, want_r = lidu_jax.lidu(dist.mean, dist.std, 3, candidates=~train, grid_size=64, chunk_size=16)
    # candidates as a per-chunk function or as a (U, n_items) array: the same numbers.
    got, got_r = distributions.lidu_from_model(
        mf, params, users, 3, candidates=lambda u: ~train[u], chunk=16, grid_size=64
    )
    np.testing.assert_array_equal(got_r, want_r)
    # Per-chunk vs whole-batch scoring may sum in another order: LiDu (nats) to 1e-4 absolute as well.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not train[users[:, None], got_r].any()  # no training item is ever in a list
    as_array, _ = distributions.lidu_from_model(
        mf, params, users, 3, candidates=~train, chunk=16, grid_size=64
    )
    np.testing.assert_array_equal(as_array, got)
    with pytest.warns(DeprecationWarning, match="exclude= is deprecated"):
        old, _ = distributions.lidu_from_model(
            mf, params, users, 3, exclude=lambda u: train[u], chunk=16, grid_size=64
        )
    np.testing.assert_array_equal(old, got)
    with pytest.raises(ValueError, match="candidates must be"):
        distributions.lidu_from_model(mf, params, users, 3, candidates=~train[:5])


def test_snapshot_and_bootstrap_sources(split, mf):
    """Value checks against the training they are defined by: snapshot s is the single run stopped after its
    epoch (fit's epoch keys do not depend on the number of epochs), and bootstrap copy m is a plain run on
    the m-th multinomial resample, which differs from the unresampled copy with the same seed."""
    n_train = split.train_users.size
    k4 = tkey(4)
    snaps = distributions.snapshot_ensemble(mf, k4, n_train, 3, n_snapshots=2, progress=False)
    assert snaps["user"].shape == (2, split.n_users, 4)
    run_key = jax.random.split(k4, 1)
    for s, epochs in enumerate((2, 3)):
        alone, _ = fit(mf, run_key, jnp.ones((1, n_train)), epochs, progress=False)
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, s=s: x[s], snaps),
            jax.tree.map(lambda x: x[0], alone),
            rtol=1e-4,
            atol=1e-5,
        )
    boot = distributions.bootstrap(mf, tkey(5), n_train, 1, n_models=2, progress=False)  # reuses M=2 compile
    assert boot["item"].shape == (2, split.n_items, 4)
    kw, kt = jax.random.split(tkey(5))
    counts = bootstrap_weights(kw, 2, n_train)
    keys = jax.random.split(kt, 2)
    resampled, _ = fit(mf, keys[1:], counts[1:], 1, progress=False)
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x[1], boot), jax.tree.map(lambda x: x[0], resampled), rtol=1e-4, atol=1e-5
    )
    unweighted, _ = fit(mf, keys[1:], jnp.ones((1, n_train)), 1, progress=False)
    assert float(jnp.abs(boot["item"][1] - unweighted["item"][0]).max()) > 1e-3
    with pytest.raises(ValueError, match="n_snapshots"):
        distributions.snapshot_ensemble(mf, key(4), n_train, 3, n_snapshots=4)
    with pytest.raises(TypeError):  # the sizes are keywords: a call in the old order cannot swap them
        distributions.snapshot_ensemble(mf, k4, n_train, 3, 2)


def test_mc_dropout(split, mf, ensemble):
    users = np.arange(split.n_users)
    drop = make_bpr_mf(split, MFConfig(dim=4, batch_size=64, dropout=0.3))
    params = jax.tree.map(lambda x: x[0], ensemble[0])
    s = distributions.mc_dropout_samples(drop, params, users, key(6), n_samples=4, chunk=16)
    chex.assert_shape(s, (4, split.n_users, split.n_items))
    assert float(jnp.abs(s[0] - s[1]).max()) > 0
    # Inverted dropout keeps the mean: the average of many passes approaches the deterministic scores.
    many = distributions.mc_dropout_samples(drop, params, users[:4], key(7), n_samples=2000)
    det = drop.score(params, jnp.asarray(users[:4]), None)
    np.testing.assert_allclose(many.mean(0), det, atol=0.05 * float(jnp.abs(det).max()) + 1e-3)
    with pytest.raises(ValueError, match="identical"):
        distributions.mc_dropout_samples(mf, params, users, key(6), n_samples=2)


def test_bayesian_mf_analytic_moments_match_posterior_draws(split):
    bm = make_bayesian_mf(split, BayesianMFConfig(dim=4, batch_size=64, init_std=0.3))
    params, _ = fit(bm, jax.random.split(key(8), 1), jnp.ones((1, split.train_users.size)), 1, progress=False)
    one = jax.tree.map(lambda x: x[0], params)
    users = jnp.arange(3)
    mean, std = bayesian_mf_moments(one, users)
    draws = jax.vmap(lambda k: bm.score(one, users, k))(jax.random.split(key(9), 5_000))
    np.testing.assert_allclose(draws.mean(0), mean, atol=4 * float(std.max()) / np.sqrt(5_000) + 1e-4)
    np.testing.assert_allclose(draws.std(0), std, rtol=0.08, atol=1e-6)
    m2, s2 = distributions.bayesian_gaussian(bm, one, np.arange(3))
    # Jitted and chunked vs op by op: the dot products may be summed in another order, so the error is a few
    # ulp of the largest term, absolute (a mean near 0 has no relative accuracy).
    scale = float(jnp.abs(mean).max() + std.max())
    chex.assert_trees_all_close((m2, s2), (mean, std), rtol=1e-5, atol=16 * EPS32 * scale)


def test_score_users_chunking_and_bad_inputs(split, mf, ensemble):
    params, _ = ensemble
    a = score_users(mf, params, np.arange(split.n_users), chunk=7)
    b = score_users(mf, params, np.arange(split.n_users), chunk=64)
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="samples"):
        distributions.from_arrays(samples=np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="std"):
        distributions.from_arrays(mean=np.zeros((2, 3)), std=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="mean"):
        distributions.from_arrays(mean=np.full((2, 3), np.nan), std=np.ones((2, 3)))
    with pytest.raises(ValueError, match="either"):
        distributions.from_arrays(mean=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="config"):
        make_bpr_mf(split, MFConfig(dropout=1.5))


def test_diverged_training_is_a_training_failure(split, mf, ensemble):
    n_train = split.train_users.size
    # A learning rate near the float32 maximum: the first Adam step overflows every parameter.
    wild = make_bpr_mf(split, MFConfig(dim=4, batch_size=64, lr=3e38))
    with pytest.raises(
        training.TrainingFailedError,
        match=r"BPR-MF copy 0, 1 of 2 .*NaN/inf parameters.*epoch 1.*learning rate",
    ) as exc:
        fit(wild, jax.random.split(tkey(0), 2), jnp.ones((2, n_train)), 2, progress=False)
    assert exc.value.exit_code == 3 and exc.value.members == (0, 1) and exc.value.model == "BPR-MF"
    # Finite weights whose scores overflow (copy 1 only): caught before the scores reach an estimator.
    params, _ = ensemble
    blown = jax.tree.map(lambda x: x.at[1].multiply(1e30), params)
    users = np.arange(split.n_users)
    with pytest.raises(training.TrainingFailedError, match="BPR-MF copy 1 of 2 gives NaN/inf scores"):
        score_users(mf, blown, users)
    with pytest.raises(ValueError, match=r"config\.lr must be finite and > 0"):
        make_bpr_mf(split, MFConfig(lr=float("nan")))
