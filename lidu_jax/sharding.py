"""LiDu with the users spread over every device (and every host).

LiDu is embarrassingly parallel over users: user ``u``'s value depends only on row ``u`` of ``mean``, ``std``
and ``candidates``. :func:`lidu_sharded` therefore lays the users out along a 1-D ``("users",)`` mesh and runs
:func:`lidu_jax.estimators.lidu` on each device's block under ``jax.shard_map``, so no device ever talks to
another. Users are processed ``users_per_device * n_devices`` at a time (the last block padded by repeating
its last user), so peak memory per device is bounded whatever the number of users.

Inside ``shard_map`` the estimator runs in its traced form, i.e. without the per-chunk pruning of rest items
that the eager :func:`lidu_jax.estimators.lidu` applies; that pruning changes ``log P`` by at most
``n_items * 1e-9``, so both agree to float32 rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lidu_jax.estimators import (
    DEFAULT_GRID_SIZE,
    METHODS,
    _check_grid,
    _check_method,
    _check_values,
    _host_locate,
    _lidu_validated,
)

__all__ = ["lidu_sharded", "user_mesh"]

AXIS = "users"


def user_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh ``("users",)`` over ``devices`` (default: all devices of all processes)."""
    devs = list(jax.devices()) if devices is None else list(devices)
    if not devs:
        raise ValueError("devices: need at least one device")
    return Mesh(np.asarray(devs, dtype=object), (AXIS,))


def _validate(mean: np.ndarray, std: np.ndarray, k: int, candidates: np.ndarray | None) -> None:
    """The checks of the eager estimators (same messages), on the host arrays in their own dtype."""
    if mean.ndim != 2:
        raise ValueError(f"mean must have shape (n_users, n_items), got {mean.shape}")
    if std.shape != mean.shape:
        raise ValueError(f"std shape {std.shape} must equal mean shape {mean.shape}")
    if candidates is not None and candidates.shape != mean.shape:
        raise ValueError(f"candidates shape {candidates.shape} must equal mean shape {mean.shape}")
    if not isinstance(k, int | np.integer) or isinstance(k, bool) or not 1 <= k <= mean.shape[1]:
        raise ValueError(f"k must be an int in [1, n_items={mean.shape[1]}], got {k!r}")
    _check_values(mean, std, None, candidates, k=int(k))


def _host_array(x: Any) -> np.ndarray:
    """A NumPy copy that keeps float64 (standardised in float64 before float32, see `lidu_jax.estimators`)
    and turns every other dtype into float32."""
    x = np.asarray(x)
    return x if x.dtype == np.float64 else x.astype(np.float32)


@functools.lru_cache(maxsize=32)
def _sharded_fn(mesh: Mesh, k: int, method: str, grid_size: int, ordered: bool, per_position: bool):
    def local(mean, std, cand):
        # the inputs were validated on the host (`_validate`): no per-user validity flags needed
        kw = dict(method=method, grid_size=grid_size, ordered=ordered, per_position=per_position)
        return _lidu_validated(mean, std, k, cand, **kw)

    spec = P(AXIS)
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec, spec))
    return jax.jit(mapped, out_shardings=(NamedSharding(mesh, spec), NamedSharding(mesh, spec)))


def _to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    # Every process holds the full block; each builds only the shards of its own devices (works multi-host).
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _gather(x: jax.Array) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def lidu_sharded(
    mean: Any,
    std: Any,
    k: int,
    *,
    candidates: Any = None,
    method: str = "exact",
    grid_size: int = DEFAULT_GRID_SIZE,
    ordered: bool = True,
    per_position: bool = False,
    mesh: Mesh | None = None,
    users_per_device: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """``LiDu_u = -log P_u(L_u)`` for every user, with users sharded over ``mesh`` (default: all devices).

    Same quantity and arguments as :func:`lidu_jax.estimators.lidu`: ``mean``, ``std`` are ``(U, n_items)``,
    ``candidates`` an optional ``(U, n_items)`` bool, ``L_u`` the top-``k`` candidates of user ``u`` by
    ``mean``. Returns NumPy ``(lidu (U,), rankings (U, k) int32)``; ``(0,)`` and ``(0, k)`` for zero users.
    Inputs must be identical on every process of a multi-host run. Bad inputs raise ``ValueError`` (the
    messages of `lidu_jax.estimators.lidu`) before anything is compiled. Each user's scores are standardised
    as in `lidu` (float64 inputs in float64 on the host first), so LiDu does not change under
    ``mean -> a mean + b``, ``std -> a std`` with ``a > 0``.
    """
    _check_method(method, METHODS)
    _check_grid(grid_size)
    mean, std = _host_array(mean), _host_array(std)
    cand = None if candidates is None else np.asarray(candidates, bool)
    _validate(mean, std, k, cand)
    if isinstance(users_per_device, bool) or not isinstance(users_per_device, int | np.integer):
        raise ValueError(f"users_per_device must be an int >= 1, got {users_per_device!r}")
    if users_per_device < 1:
        raise ValueError(f"users_per_device must be >= 1, got {users_per_device}")
    if mean.shape[0] == 0:
        return np.zeros(0, np.float32), np.zeros((0, int(k)), np.int32)
    if mean.dtype == np.float64 or std.dtype == np.float64:
        mean, std = _host_locate(mean, std, cand)
    mesh = user_mesh() if mesh is None else mesh
    if mesh.axis_names != (AXIS,):
        raise ValueError(f"mesh must be 1-D with axis {AXIS!r} (see user_mesh), got axes {mesh.axis_names}")
    if cand is None:
        cand = np.ones(mean.shape, bool)
    n_users = mean.shape[0]
    n_dev = mesh.devices.size
    # Small inputs need no full block: shrink it (still a multiple of the device count) to save work.
    block = n_dev * min(users_per_device, -(-n_users // n_dev))
    fn = _sharded_fn(mesh, int(k), method, int(grid_size), bool(ordered), bool(per_position))
    sharding = NamedSharding(mesh, P(AXIS))
    values, ranks = [], []
    for start in range(0, n_users, block):
        stop = min(start + block, n_users)
        pad = block - (stop - start)
        parts = []
        for x in (mean, std, cand):
            chunk = x[start:stop]
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            parts.append(_to_global(chunk, sharding))
        v, r = fn(*parts)
        values.append(_gather(v)[: stop - start])
        ranks.append(_gather(r)[: stop - start])
    return np.concatenate(values), np.concatenate(ranks).astype(np.int32)
