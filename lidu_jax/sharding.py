"""LiDu with the users spread over every device (and every host).

LiDu is embarrassingly parallel over users: user ``u``'s value depends only on row ``u`` of ``mean``, ``std``
and ``candidates``. :func:`lidu_sharded` therefore lays the users out along a 1-D ``("users",)`` mesh and runs
the estimator of :func:`lidu_jax.estimators.lidu` on each device's block under ``jax.shard_map``, so no device
ever talks to another. Users are processed ``chunk_size * n_devices`` at a time (each device takes a chunk of
``chunk_size`` users per call, the last block padded by repeating its last user), so peak memory per device is
bounded whatever the number of users. The backend is the mesh's platform (`lidu_jax.backend`).

Inside ``shard_map`` the estimator runs in its traced form, i.e. without the per-chunk pruning of rest items
that the eager :func:`lidu_jax.estimators.lidu` applies; that pruning changes ``log P`` by at most
``n_items * 1e-9``, so both agree to float32 rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lidu_jax import reference
from lidu_jax.backend import default_tile_size, gaussian_log_prob, resolve_backend
from lidu_jax.estimators import DEFAULT_GRID_SIZE, METHODS, top_k_rankings
from lidu_jax.standardise import host_locate, standardise
from lidu_jax.types import LiduResult
from lidu_jax.validation import (
    check_count,
    check_grid,
    check_k,
    check_method,
    check_shapes,
    check_values,
    renamed,
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
    """The eager estimators' checks (the same functions, so the same messages) on the host arrays in their
    own dtype; the users must be one axis, since they are what is sharded."""
    check_shapes(mean, std, None, candidates)
    if mean.ndim != 2:
        raise ValueError(f"mean must have shape (n_users, n_items), got {mean.shape}")
    check_k(k, mean.shape[1])
    check_values(mean, std, None, candidates, k=int(k))


def _host_array(x: Any) -> np.ndarray:
    """A NumPy copy that keeps float64 (standardised in float64 before float32, see `lidu_jax.estimators`)
    and turns every other dtype into float32."""
    x = np.asarray(x)
    return x if x.dtype == np.float64 else x.astype(np.float32)


@functools.lru_cache(maxsize=32)
def _sharded_fn(
    mesh: Mesh, k: int, method: str, grid_size: int, ordered: bool, per_position: bool, backend: str
):
    def local(mean, std, cand):
        # the inputs were validated on the host (`_validate`): no per-user validity flags needed
        rankings = top_k_rankings(mean, k, cand)
        log_p = gaussian_log_prob(
            *standardise(mean, std, rankings, cand),
            rankings,
            cand,
            method=method,
            ordered=ordered,
            grid_size=grid_size,
            n_keep=None,
            backend=backend,
            tile_size=default_tile_size(backend),
        )
        return (reference.per_position_lidu(log_p, k) if per_position else -log_p), rankings

    spec = P(AXIS)
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec, spec))
    return jax.jit(mapped, out_shardings=(NamedSharding(mesh, spec), NamedSharding(mesh, spec)))


# host_to_global and to_host are verbatim copies of ast_jax.sharding's (neither package imports the other;
# tests/test_packaging.py keeps the copies identical).


def host_to_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """Build a global ``jax.Array`` from a host array that every process holds in full.

    Each process contributes only the shards its own devices need, so this works unchanged on one host and
    across hosts (unlike ``jax.device_put`` of a process-local value).
    """
    arr = np.asarray(x)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def to_host(tree: Any) -> Any:
    """Full NumPy copies of every array of ``tree`` (possibly sharded over several hosts), on every process.

    One process: ``jax.device_get``. Several: a tiled ``process_allgather``, so a leaf sharded across hosts
    comes back whole (``device_get`` would fail on shards another process holds). A collective then: every
    process must call it.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


_OLD_NAMES = {"users_per_device": "chunk_size"}  # lidu_sharded's deprecated keyword name


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
    chunk_size: int | None = None,
    backend: str | None = None,
    **deprecated: Any,
) -> LiduResult:
    """``LiDu_u = -log P_u(L_u)`` for every user, with users sharded over ``mesh`` (default: all devices).

    Same quantity and arguments as :func:`lidu_jax.estimators.lidu`: ``mean``, ``std`` are ``(U, n_items)``,
    ``candidates`` an optional ``(U, n_items)`` bool, ``L_u`` the top-``k`` candidates of user ``u`` by
    ``mean``. Inputs must be identical on every process of a multi-host run. Bad inputs raise ``ValueError``
    (the messages of `lidu_jax.estimators.lidu`) before anything is compiled. Each user's scores are
    standardised as in `lidu` (float64 inputs in float64 on the host first), so LiDu does not change under
    ``mean -> a mean + b``, ``std -> a std`` with ``a > 0``.

    Args:
      mean, std, k, candidates, method, grid_size, ordered, per_position: as `lidu_jax.estimators.lidu`.
      mesh: a 1-D ``("users",)`` mesh (`user_mesh`); default all devices of all processes.
      chunk_size: users per device per call (default 256).
      backend: ``"cpu"``, ``"accelerator"`` or None (the platform of the mesh's devices).
      **deprecated: ``users_per_device`` (now ``chunk_size``), with a warning.

    Returns:
      `LiduResult` ``(values (U,), rankings (U, k) int32)``; ``(0,)`` and ``(0, k)`` for zero users.
    """
    chunk_size = renamed("lidu_sharded", deprecated, _OLD_NAMES, chunk_size=chunk_size)["chunk_size"]
    chunk_size = 256 if chunk_size is None else chunk_size
    check_method(method, METHODS)
    check_grid(grid_size)
    backend = None if backend is None else resolve_backend(backend)  # checked before anything is computed
    mean, std = _host_array(mean), _host_array(std)
    cand = None if candidates is None else np.asarray(candidates, bool)
    _validate(mean, std, k, cand)
    check_count("chunk_size", chunk_size, allow_none=False)
    if mean.shape[0] == 0:
        return LiduResult(jnp.zeros(0, jnp.float32), jnp.zeros((0, int(k)), jnp.int32))
    if mean.dtype == np.float64 or std.dtype == np.float64:
        mean, std = host_locate(mean, std, cand)
    mesh = user_mesh() if mesh is None else mesh
    if mesh.axis_names != (AXIS,):
        raise ValueError(f"mesh must be 1-D with axis {AXIS!r} (see user_mesh), got axes {mesh.axis_names}")
    if backend is None:  # the platform of the devices the users are sharded over
        backend = "cpu" if {d.platform for d in mesh.devices.flat} == {"cpu"} else "accelerator"
    if cand is None:
        cand = np.ones(mean.shape, bool)
    n_users = mean.shape[0]
    n_dev = mesh.devices.size
    # Small inputs need no full block: shrink it (still a multiple of the device count) to save work.
    block = n_dev * min(chunk_size, -(-n_users // n_dev))
    fn = _sharded_fn(mesh, int(k), method, int(grid_size), bool(ordered), bool(per_position), backend)
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
            parts.append(host_to_global(chunk, sharding))
        v, r = fn(*parts)
        values.append(np.asarray(to_host(v))[: stop - start])
        ranks.append(np.asarray(to_host(r))[: stop - start])
    return LiduResult(
        jnp.asarray(np.concatenate(values)), jnp.asarray(np.concatenate(ranks).astype(np.int32))
    )
