"""The input checks of the LiDu estimators, with the messages every entry point shares.

Shape, static-argument and count checks raise ``ValueError`` naming the argument. The value checks
(`value_checks`: finite means, stds > 0, valid and distinct ids, enough candidates) are written once and
used three ways: eager mode raises (`check_values`), a traced estimator returns NaN for the users that fail
(`rows_ok`), and the `checked_*` estimators turn them into `jax.experimental.checkify` checks with eager
mode's messages (`checkify_values`, `raise_checkify_error`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(*xs: Any) -> bool:
    """Whether none of ``xs`` (None entries allowed) is a tracer."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def check_method(method: str, allowed: tuple[str, ...]) -> None:
    if method not in allowed:
        raise ValueError(f"method must be one of {allowed}, got {method!r}")


def check_grid(grid_size: int) -> None:
    if not isinstance(grid_size, int) or grid_size < 8:
        raise ValueError(f"grid_size must be an int >= 8, got {grid_size!r}")


def check_count(name: str, value: Any, *, allow_none: bool = True) -> None:
    """``value`` must be an int >= 1 (or None where allowed); the ValueError names the argument."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def check_k(k: int, n_items: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:  # True is an int in Python
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > n_items:
        raise ValueError(f"k={k} is larger than the number of items {n_items}")


def check_shapes(mean, std, ranking, candidates) -> None:
    """``mean, std, candidates (..., n)`` and ``ranking (..., K)`` integer, ``K >= 1``."""
    if mean.ndim < 1:
        raise ValueError(f"mean must have shape (..., n_items), got {mean.shape}")
    if std.shape != mean.shape:
        raise ValueError(f"std must have the shape of mean {mean.shape}, got {std.shape}")
    if ranking is not None:
        if ranking.ndim != mean.ndim or ranking.shape[:-1] != mean.shape[:-1]:
            raise ValueError(f"ranking must have shape {(*mean.shape[:-1], 'K')}, got {ranking.shape}")
        if ranking.shape[-1] < 1:
            raise ValueError("ranking must hold at least one item (K >= 1)")
        if not jnp.issubdtype(ranking.dtype, jnp.integer):
            raise ValueError(f"ranking must be integer item ids, got dtype {ranking.dtype}")
    if candidates is not None and candidates.shape != mean.shape:
        raise ValueError(f"candidates must have the shape of mean {mean.shape}, got {candidates.shape}")


def check_samples(samples) -> None:
    if samples.ndim < 2:
        raise ValueError(f"samples must have shape (n_samples, ..., n_items), got {samples.shape}")
    if samples.shape[0] < 2:
        raise ValueError(f"samples needs at least 2 draws along axis 0, got {samples.shape[0]}")


def check_min_std(min_std) -> None:
    if not (isinstance(min_std, int | float | np.floating) and math.isfinite(min_std) and min_std > 0):
        raise ValueError(f"min_std must be a finite float > 0, got {min_std!r}")


MSG_MEAN = "mean contains NaN or inf"
MSG_K = "K={} is larger than the number of candidates ({}) for some user"
MSG_DUPLICATE = "ranking contains a duplicate item for some user"
MSG_EXCLUDED = "ranking contains an item excluded by candidates"


def _msg_std(dtype) -> str:
    tiny = float(jnp.finfo(dtype).tiny)
    return (
        f"std must be finite and > 0 everywhere (a {np.dtype(dtype).name} std below {tiny:.3g}, a subnormal, "
        "counts as 0: XLA flushes subnormals to zero)"
    )


def value_checks(xp, mean, std, ranking, candidates, k: int | None = None):
    """The value checks of the Gaussian estimators as ``[(ok, message, args)]``, ``ok`` a per-user bool
    ``(...)``; ``xp`` is `numpy` (concrete inputs) or `jax.numpy`.

    A std below the smallest normal number of its dtype counts as 0: XLA on CPU flushes subnormals to zero,
    so such an std would reach the computation as 0."""
    n = mean.shape[-1]
    tiny = jnp.finfo(std.dtype).tiny if jnp.issubdtype(std.dtype, jnp.floating) else 0
    checks = [
        (xp.all(xp.isfinite(mean), axis=-1), MSG_MEAN, ()),
        (xp.all(xp.isfinite(std) & (std >= tiny), axis=-1), _msg_std(std.dtype), ()),
    ]
    cand = None if candidates is None else candidates.astype(bool)
    n_cand = xp.full(mean.shape[:-1], n) if cand is None else xp.sum(cand, axis=-1)
    kk = k if ranking is None else ranking.shape[-1]
    fewest = xp.min(n_cand, initial=n)
    checks.append((n_cand >= kk, MSG_K, (kk, fewest)))
    if ranking is not None:
        checks.append(
            (xp.all((ranking >= 0) & (ranking < n), axis=-1), f"ranking holds item ids outside [0, {n})", ())
        )
        srt = xp.sort(ranking, axis=-1)
        checks.append((~xp.any(srt[..., 1:] == srt[..., :-1], axis=-1), MSG_DUPLICATE, ()))
        if cand is not None:
            picked = xp.take_along_axis(cand, xp.clip(ranking, 0, n - 1), axis=-1)
            checks.append((xp.all(picked, axis=-1), MSG_EXCLUDED, ()))
    return checks


def check_values(mean, std, ranking, candidates, k: int | None = None) -> None:
    """`value_checks` on concrete inputs: ``ValueError`` with the first failing check's message."""
    mean, std = np.asarray(mean), np.asarray(std)
    ranking = None if ranking is None else np.asarray(ranking)
    candidates = None if candidates is None else np.asarray(candidates)
    for ok, message, args in value_checks(np, mean, std, ranking, candidates, k):
        if not np.all(ok):
            raise ValueError(message.format(*(int(a) for a in args)))


def rows_ok(mean, std, ranking, candidates, k: int | None = None) -> jax.Array:
    """``(...)`` bool: the users whose (traced) inputs pass every check of `value_checks`."""
    ok = True
    for row_ok, _, _ in value_checks(jnp, mean, std, ranking, candidates, k):
        ok = ok & row_ok
    return jnp.broadcast_to(ok, mean.shape[:-1])


def checkify_values(mean, std, ranking, candidates, k: int | None = None) -> None:
    """`value_checks` as `jax.experimental.checkify` checks, with the messages of eager mode."""
    from jax.experimental import checkify

    for ok, message, args in value_checks(jnp, mean, std, ranking, candidates, k):
        checkify.check(jnp.all(ok), message, *(jnp.asarray(a) for a in args))


def raise_checkify_error(err) -> None:
    """Raise the first failed check of a `checkify` error as the ``ValueError`` that eager mode raises."""
    exc = err.get_exception()
    if exc is not None:
        raise ValueError(exc.fmt_string.format(*exc.args, **exc.kwargs)) from None


def renamed(fn_name: str, old_kwargs: Mapping[str, Any], renames: Mapping[str, str], **current: Any) -> dict:
    """Keyword arguments under their current names, taking deprecated old names from ``old_kwargs`` (a
    function's ``**kwargs``) with a ``DeprecationWarning``. ``current`` maps each current name to its value
    (None: not given). An unknown name, or a value under both names, is a ``TypeError`` as Python raises for
    a bad call."""
    out = dict(current)
    for old, value in old_kwargs.items():
        if old not in renames:
            raise TypeError(f"{fn_name}() got an unexpected keyword argument {old!r}")
        new = renames[old]
        if out[new] is not None:
            raise TypeError(f"{fn_name}() got {new!r} and its deprecated name {old!r}; give {new!r} only")
        warnings.warn(f"{fn_name}({old}=...) is deprecated; use {new}=", DeprecationWarning, stacklevel=3)
        out[new] = value
    return out
