"""Distillation losses against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ast_jax.distill import (
    LossConfig,
    cross_entropy_loss,
    distill_loss,
    hidden_mse_loss,
    kl_distill_loss,
    reverse_kl_distill_loss,
)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(p_logits, q_logits, t):
    """Mean over tokens of T² · KL(softmax(p/T) || softmax(q/T)), in float64."""
    lp, lq = np_log_softmax(p_logits / t), np_log_softmax(q_logits / t)
    return t**2 * np.mean(np.sum(np.exp(lp) * (lp - lq), -1))


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    return rng.normal(size=(2, 5, 7)) * 3, rng.normal(size=(2, 5, 7)) * 3, rng.integers(0, 7, size=(2, 5))


def test_kl_zero_for_identical_logits(logits):
    s, _, _ = logits
    assert float(kl_distill_loss(jnp.asarray(s), jnp.asarray(s))) == pytest.approx(0.0, abs=1e-6)
    assert float(reverse_kl_distill_loss(jnp.asarray(s), jnp.asarray(s))) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_forward_and_reverse_kl_match_numpy(logits, t):
    s, te, _ = logits
    got = float(kl_distill_loss(jnp.asarray(s, jnp.float32), jnp.asarray(te, jnp.float32), t))
    assert got == pytest.approx(np_kl(te, s, t), rel=1e-5)
    got_r = float(reverse_kl_distill_loss(jnp.asarray(s, jnp.float32), jnp.asarray(te, jnp.float32), t))
    assert got_r == pytest.approx(np_kl(s, te, t), rel=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 20.0))
def test_kl_is_nonnegative(seed, scale):
    rng = np.random.default_rng(seed)
    s, te = (jnp.asarray(rng.normal(size=(3, 6)) * scale, jnp.float32) for _ in range(2))
    assert float(kl_distill_loss(s, te)) >= -1e-5


def test_cross_entropy_and_weights_match_numpy(logits):
    s, _, y = logits
    lp = np_log_softmax(s)
    nll = -np.take_along_axis(lp, y[..., None], -1)[..., 0]
    assert float(cross_entropy_loss(jnp.asarray(s), jnp.asarray(y))) == pytest.approx(nll.mean(), rel=1e-5)
    w = np.zeros((2, 5))
    w[0, :3] = 1
    got = float(cross_entropy_loss(jnp.asarray(s), jnp.asarray(y), jnp.asarray(w)))
    assert got == pytest.approx(nll[0, :3].mean(), rel=1e-5)
    with pytest.raises(ValueError, match="targets shape"):
        cross_entropy_loss(jnp.asarray(s), jnp.asarray(y[:, :3]))


def test_hidden_mse_matches_numpy_and_mixed_loss(logits):
    rng = np.random.default_rng(1)
    hs = [rng.normal(size=(2, 5, 4)) for _ in range(3)]
    ht = [rng.normal(size=(2, 5, 4)) for _ in range(3)]
    ref = np.mean([np.sum((hs[i] - ht[i]) ** 2) / np.sum(ht[i] ** 2) for i in (1, 2)])
    got = float(hidden_mse_loss([jnp.asarray(h) for h in hs], [jnp.asarray(h) for h in ht]))
    assert got == pytest.approx(ref, rel=1e-5)
    s, te, y = (jnp.asarray(x) for x in logits)
    cfg = LossConfig(w_kl=0.67, w_ce=0.33, w_hidden=0.5)
    loss, parts = distill_loss(s, y, cfg, te, [jnp.asarray(h) for h in hs], [jnp.asarray(h) for h in ht])
    want = 0.67 * float(kl_distill_loss(s, te, 2.0)) + 0.33 * float(cross_entropy_loss(s, y)) + 0.5 * ref
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert set(parts) == {"ce", "kl", "hidden"}


def test_kl_gradient_vanishes_at_the_teacher():
    te = jax.random.normal(jax.random.key(0), (4, 9))
    g = jax.jit(
        jax.grad(lambda s: kl_distill_loss(s, te)), compiler_options={"xla_backend_optimization_level": 0}
    )(te)
    assert float(jnp.max(jnp.abs(g))) < 1e-6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"w_kl": -1.0}, "w_kl"),
        ({"w_kl": 0.0, "w_ce": 0.0}, "all loss weights"),
        ({"temperature": 0.0}, "temperature"),
        ({"kl_kind": "js"}, "kl_kind"),
    ],
)
def test_loss_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)


def test_missing_teacher_is_an_error(logits):
    s, _, y = logits
    with pytest.raises(ValueError, match="teacher_logits"):
        distill_loss(jnp.asarray(s), jnp.asarray(y), LossConfig())
