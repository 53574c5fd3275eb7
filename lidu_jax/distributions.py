"""Where per-item score distributions come from: generic sources over any `RecModel`.

Every source ends in either score samples ``(n_samples, U, n_items)`` (ensemble members, bootstrap copies,
dropout passes, snapshots, posterior draws) or Gaussian parameters ``(mean, std)`` each ``(U, n_items)``; the
estimators in `lidu_jax.estimators` take either (``lidu`` / ``lidu_from_samples``).

Sources, with one argument order (positional: the model, then what it starts from, then the data;
sizes by keyword):

  - training sources ``source(model, key, n_train, epochs, *, n_models | n_snapshots)`` return stacked
    parameters (a leading copy axis):
      deep ensemble: copies trained from different seeds at once (`jax.vmap` over PRNG keys);
      bootstrap: copies trained on multinomially resampled interactions (`jax.vmap` over weights);
      snapshot ensemble: the parameters after the last epochs of one run;
  - scoring sources ``source(model, params, users[, key], *, ...)`` return scores for ``users``:
      `stacked_samples`: the deterministic scores of each stacked copy;
      MC dropout: stochastic forward passes of one trained model (the model's ``score(params, users, key)``);
      Bayesian MF: the analytic Gaussian score posterior of `lidu_jax.models.mf.make_bayesian_mf`;
  - bring-your-own: arrays from any other recommender (`from_arrays`).

Masks follow the convention of every `lidu_jax` module: ``candidates`` is bool, True = the item may be
recommended (e.g. not a training item).

Changed in issue 13: the sizes became keyword arguments (``deep_ensemble(model, key, m, n_train, epochs)``
is now ``deep_ensemble(model, key, n_train, epochs, n_models=m)``; ``snapshot_ensemble`` and ``bootstrap``
alike; ``mc_dropout_samples(model, params, users, n, key)`` is ``mc_dropout_samples(model, params, users,
key, n_samples=n)``; ``bayesian_gaussian`` takes the model first), so a call in the old order raises
``TypeError`` instead of silently swapping two sizes. `lidu_from_model` takes ``candidates`` (the
``exclude`` callable is a deprecated alias).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lidu_jax.estimators import lidu_chunked
from lidu_jax.models.base import RecModel
from lidu_jax.models.mf import bayesian_mf_moments
from lidu_jax.samples import sample_moments
from lidu_jax.training import bootstrap_weights, check_finite_scores, fit, flatten_snapshots, score_users

PyTree = Any

__all__ = [
    "ScoreDistribution",
    "bayesian_gaussian",
    "bootstrap",
    "deep_ensemble",
    "from_arrays",
    "lidu_from_model",
    "mc_dropout_samples",
    "sample_moments",
    "snapshot_ensemble",
    "stacked_samples",
]


class ScoreDistribution(NamedTuple):
    """Per-item predictive score distributions for a set of users.

    Attributes:
      mean: ``(U, n_items)`` mean score (the point prediction used to rank).
      std: ``(U, n_items)`` score std (> 0).
      samples: ``(S, U, n_items)`` draws, or ``None`` for a purely Gaussian source.
    """

    mean: jax.Array
    std: jax.Array
    samples: jax.Array | None


def _ones(m: int, n_train: int) -> jax.Array:
    return jnp.ones((m, n_train), jnp.float32)


def _keys(key: jax.Array, m: int) -> jax.Array:
    if m < 1:
        raise ValueError(f"the number of models must be >= 1, got {m}")
    return jax.random.split(key, m)


def deep_ensemble(
    model: RecModel, key: jax.Array, n_train: int, epochs: int, *, n_models: int, progress: bool = True
) -> PyTree:
    """Parameters of ``n_models`` copies trained from seeds ``split(key, n_models)`` on all ``n_train``
    interactions for ``epochs`` epochs: leading ``n_models`` axis."""
    params, _ = fit(model, _keys(key, n_models), _ones(n_models, n_train), epochs, progress=progress)
    return params


def bootstrap(
    model: RecModel, key: jax.Array, n_train: int, epochs: int, *, n_models: int, progress: bool = True
) -> PyTree:
    """``n_models`` copies, copy m trained on the m-th multinomial resample of the ``n_train`` interactions
    (`lidu_jax.training.bootstrap_weights`: interaction i counted ``c_mi`` times, ``sum_i c_mi = n_train``)
    from its own seed: leading ``n_models`` axis."""
    kw, kt = jax.random.split(key)
    w = bootstrap_weights(kw, n_models, n_train)
    params, _ = fit(model, _keys(kt, n_models), w, epochs, progress=progress)
    return params


def snapshot_ensemble(
    model: RecModel, key: jax.Array, n_train: int, epochs: int, *, n_snapshots: int, progress: bool = True
) -> PyTree:
    """One run of ``epochs`` epochs from seed ``split(key, 1)[0]``; the parameters after each of its last
    ``n_snapshots`` epochs, stacked on a leading axis (oldest first)."""
    if not 1 <= n_snapshots <= epochs:
        raise ValueError(f"n_snapshots must be in [1, epochs={epochs}], got {n_snapshots}")
    snaps = tuple(range(epochs - n_snapshots + 1, epochs + 1))
    _, stacked = fit(
        model, _keys(key, 1), _ones(1, n_train), epochs, snapshot_epochs=snaps, progress=progress
    )
    return flatten_snapshots(stacked)


def stacked_samples(
    model: RecModel, stacked_params: PyTree, users: np.ndarray, *, chunk: int = 1024
) -> jax.Array:
    """``(M, U, n_items)`` deterministic scores of each stacked copy (ensemble, bootstrap, snapshots)."""
    return score_users(model, stacked_params, users, chunk=chunk)


def mc_dropout_samples(
    model: RecModel,
    params: PyTree,
    users: np.ndarray,
    key: jax.Array,
    *,
    n_samples: int,
    chunk: int = 1024,
) -> jax.Array:
    """``(n_samples, U, n_items)`` scores from ``n_samples`` stochastic passes ``score(params, users,
    key_s)``, pass s of chunk c with ``key_s = split(fold_in(key, c), n_samples)[s]``.

    ``params`` is one model's parameters (no leading axis). The model must sample something given a key
    (e.g. `make_bpr_mf` with ``dropout > 0``); otherwise all passes are identical and a ValueError is raised.
    NaN/inf scores (a diverged training run) are a `lidu_jax.training.TrainingFailedError`.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer) or n_samples < 2:
        raise ValueError(f"n_samples must be an int >= 2, got {n_samples!r}")
    users = np.asarray(users)
    fn = jax.jit(jax.vmap(model.score, in_axes=(None, None, 0)))
    out = []
    for c, start in enumerate(range(0, users.shape[0], chunk)):
        u = jnp.asarray(users[start : start + chunk], jnp.int32)
        out.append(fn(params, u, jax.random.split(jax.random.fold_in(key, c), n_samples)))
    samples = jnp.concatenate(out, axis=1)
    check_finite_scores(samples, model.name, unit="dropout pass")
    if bool(jnp.all(samples[0] == samples[1])):
        raise ValueError(f"model {model.name!r} gives identical scores for different keys (no dropout?)")
    return samples


def bayesian_gaussian(
    model: RecModel, params: PyTree, users: np.ndarray, *, chunk: int = 1024, min_std: float = 1e-6
) -> tuple[jax.Array, jax.Array]:
    """Analytic Gaussian score posterior of a Bayesian MF (`lidu_jax.models.mf.make_bayesian_mf`, one model,
    no copy axis): ``(mean, std)`` each ``(U, n_items)``, std floored at ``min_std``
    (`lidu_jax.models.mf.bayesian_mf_moments` gives the equations). NaN/inf moments (a diverged training
    run) are a `lidu_jax.training.TrainingFailedError` naming ``model``."""
    users = np.asarray(users)
    fn = jax.jit(bayesian_mf_moments)
    parts = [
        fn(params, jnp.asarray(users[s : s + chunk], jnp.int32)) for s in range(0, users.shape[0], chunk)
    ]
    mean = jnp.concatenate([p[0] for p in parts])
    std = jnp.maximum(jnp.concatenate([p[1] for p in parts]), min_std)
    check_finite_scores((mean + std)[None], f"{model.name} (posterior mean/std)")
    return mean, std


def from_arrays(
    *,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
    samples: np.ndarray | None = None,
    min_std: float = 1e-6,
) -> ScoreDistribution:
    """Bring-your-own distributions: either ``samples (S, U, n)`` or both ``mean`` and ``std`` ``(U, n)``.

    Validates shapes and values (finite; std > 0) and fills in the moments from samples.
    """
    if samples is not None:
        s = jnp.asarray(samples, jnp.float32)
        if s.ndim != 3 or s.shape[0] < 2:
            raise ValueError(f"samples must be (S >= 2, U, n_items), got {s.shape}")
        if not bool(jnp.all(jnp.isfinite(s))):
            raise ValueError("samples contain NaN or inf")
        m, sd = sample_moments(s, min_std)
        return ScoreDistribution(m, sd, s)
    if mean is None or std is None:
        raise ValueError("give either samples, or both mean and std")
    m, sd = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    if m.ndim != 2 or sd.shape != m.shape:
        raise ValueError(f"mean and std must both be (U, n_items), got {m.shape} and {sd.shape}")
    if not bool(jnp.all(jnp.isfinite(m))):
        raise ValueError("mean contains NaN or inf")
    if not bool(jnp.all(jnp.isfinite(sd))) or bool(jnp.any(sd <= 0)):
        raise ValueError("std must be finite and > 0")
    return ScoreDistribution(m, sd, None)


CandidateSource = np.ndarray | jax.Array | Callable[[np.ndarray], Any]


def lidu_from_model(
    model: RecModel,
    stacked_params: PyTree,
    users: np.ndarray,
    k: int,
    *,
    candidates: CandidateSource | None = None,
    exclude: Callable[[np.ndarray], Any] | None = None,
    chunk: int = 1024,
    min_std: float = 1e-6,
    **lidu_kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """LiDu of every user from an ensemble-like stack of models, ``chunk`` users at a time.

    Scores of the M copies are computed per chunk, reduced to per-item mean and std
    (`lidu_jax.estimators.sample_moments`) and passed to `lidu_jax.estimators.lidu_chunked`, so memory stays
    at ``O(M * chunk * n_items)`` for any number of users.

    Args:
      model: the `RecModel`.
      stacked_params: parameters with a leading ``M >= 2`` axis.
      users: ``(U,)`` user ids.
      k: list length.
      candidates: optional bool mask, True = the item may be recommended: a ``(U, n_items)`` array aligned
        with ``users``, or a function ``candidates(user_ids (B,)) -> (B, n_items)`` (e.g.
        ``lambda u: ~train[u]``, so the full mask never has to exist).
      exclude: deprecated: ``exclude(user_ids) -> (B, n_items)`` of items to leave out, i.e. the callable
        inverse of ``candidates``.
      chunk: users per step.
      **lidu_kwargs: forwarded to `lidu_chunked` (method, grid_size, ordered, per_position).

    Returns:
      a :class:`lidu_jax.LiduResult` ``(values (U,), rankings (U, k))`` of ``jax.Array``.
    """
    users = np.asarray(users)
    if exclude is not None:
        if candidates is not None:
            raise ValueError(
                "lidu_from_model: give candidates (True = eligible), not also the deprecated exclude"
            )
        warnings.warn(
            "lidu_from_model: exclude= is deprecated; pass candidates=lambda u: ~exclude(u) "
            "(True = the item may be recommended)",
            DeprecationWarning,
            stacklevel=2,
        )
        candidates = lambda u: ~np.asarray(exclude(u), bool)
    rows = None
    if candidates is not None and not callable(candidates):
        rows = np.asarray(candidates, bool)
        if rows.ndim != 2 or rows.shape[0] != users.shape[0]:
            raise ValueError(
                f"candidates must be (U={users.shape[0]}, n_items) or a function, got {rows.shape}"
            )
    m = jax.tree.leaves(stacked_params)[0].shape[0]
    if m < 2:
        raise ValueError(f"stacked_params needs >= 2 models to estimate a spread, got {m}")
    fn = jax.jit(jax.vmap(lambda p, u: model.score(p, u, None), in_axes=(0, None)))

    def chunks() -> Iterator[tuple[jax.Array, jax.Array, jax.Array | None]]:
        for start in range(0, users.shape[0], chunk):
            u = users[start : start + chunk]
            scores = fn(stacked_params, jnp.asarray(u, jnp.int32))
            check_finite_scores(scores, model.name)
            mean, std = sample_moments(scores, min_std)
            if candidates is None:
                cand = None
            else:
                cand = rows[start : start + chunk] if rows is not None else candidates(u)
            yield mean, std, None if cand is None else jnp.asarray(cand, bool)

    return lidu_chunked(chunks(), k, chunk_size=chunk if users.shape[0] > chunk else None, **lidu_kwargs)
