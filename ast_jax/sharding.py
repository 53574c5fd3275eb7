"""Meshes, sharding rules and multi-host start-up for AST training.

The layout is plain FSDP plus data parallelism on a 2-D mesh ``(data, fsdp)``:

* a batch ``(B, ...)`` is split over *both* axes (every device sees ``B / (data * fsdp)`` rows);
* a parameter or optimizer-state leaf is split over ``fsdp`` along its largest dimension divisible by the
  ``fsdp`` size, and replicated over ``data``; leaves under ``min_shard_size`` elements stay replicated.

The rule depends only on a leaf's shape, so Adam moments and the boolean masks held in the optimizer state
land exactly where their kernels are, with no special casing. Sharding is then done by passing these
``NamedSharding`` pytrees to ``jax.jit`` (``in_shardings`` / ``out_shardings``): XLA inserts the
all-gathers and reduce-scatters.

Host arrays in and out (:func:`host_to_global`, :func:`to_host`, :func:`any_process`) live here too, so every
``ast_jax`` module moves data between the host and a (multi-host) mesh the same way. ``lidu_jax.sharding``
carries identical copies of :func:`host_to_global` and :func:`to_host` (neither package imports the other;
``tests/test_packaging.py`` keeps the copies identical).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "AXES",
    "any_process",
    "batch_sharding",
    "host_to_global",
    "initialize_distributed",
    "leaf_spec",
    "make_mesh",
    "param_shardings",
    "parse_mesh",
    "replicated",
    "shard_pytree",
    "to_host",
]

PyTree = Any
AXES = ("data", "fsdp")
_log = logging.getLogger(__name__)


def parse_mesh(spec: str | Mapping[str, int], n_devices: int | None = None) -> dict[str, int]:
    """Parse ``"data=4,fsdp=2"`` into ``{"data": 4, "fsdp": 2}`` (both axes always present).

    One axis may be ``-1``: it takes whatever ``n_devices`` leaves (with ``n_devices=None`` it stays ``-1``:
    a syntax check only). A missing axis has size 1. Raises
    ``ValueError`` naming the problem for unknown axis names, non-positive sizes or a product that does not
    equal ``n_devices`` (when given).
    """
    if isinstance(spec, str):
        sizes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if "=" not in part:
                raise ValueError(f"mesh: expected 'axis=size' items like 'data=4,fsdp=2', got {part!r}")
            name, value = (s.strip() for s in part.split("=", 1))
            if name in sizes:
                raise ValueError(f"mesh: axis {name!r} given twice in {spec!r}")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ValueError(f"mesh: size of axis {name!r} must be an integer, got {value!r}") from None
    else:
        sizes = {str(k): int(v) for k, v in spec.items()}
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis {sorted(unknown)}; the axes are {AXES}")
    full = {a: sizes.get(a, 1) for a in AXES}
    free = [a for a, s in full.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {spec!r}")
    bad = [a for a, s in full.items() if s < 1 and s != -1]
    if bad:
        raise ValueError(f"mesh: axis sizes must be positive (or one -1), got {full}")
    known = math.prod(s for s in full.values() if s != -1)
    if n_devices is None:
        return full  # syntax check only; a -1 axis is resolved once the device count is known
    if free:
        if n_devices % known:
            raise ValueError(f"mesh: {n_devices} devices cannot be split with fixed axes {full}")
        full[free[0]] = n_devices // known
    if math.prod(full.values()) != n_devices:
        raise ValueError(
            f"mesh: {spec!r} needs {math.prod(full.values())} devices but {n_devices} are available "
            f"({jax.process_count()} process(es)); make data*fsdp equal the device count"
        )
    return full


def make_mesh(spec: str | Mapping[str, int] = "data=-1", devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: every device of every process).

    ``spec`` as in :func:`parse_mesh`. The device order follows ``jax.make_mesh`` (topology aware on TPU), so
    the ``fsdp`` axis, which carries the parameter all-gathers, gets the fastest links.
    """
    devs = list(jax.devices()) if devices is None else list(devices)
    sizes = parse_mesh(spec, len(devs))
    shape = tuple(sizes[a] for a in AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    if devices is None:
        return jax.make_mesh(shape, AXES, axis_types=auto)
    return Mesh(np.asarray(devs, dtype=object).reshape(shape), AXES, axis_types=auto)


def leaf_spec(shape: Sequence[int], fsdp_size: int, *, min_shard_size: int = 2**14) -> P:
    """FSDP partition spec for one leaf: shard its largest dimension divisible by ``fsdp_size`` over ``fsdp``.

    Scalars, leaves with fewer than ``min_shard_size`` elements and leaves with no divisible dimension are
    replicated (``P()``). Ties between equal dimensions go to the first one, so the result is a pure function
    of ``shape``.
    """
    shape = tuple(int(d) for d in shape)
    if fsdp_size <= 1 or not shape or math.prod(shape) < min_shard_size:
        return P()
    candidates = [(d, -i) for i, d in enumerate(shape) if d % fsdp_size == 0]
    if not candidates:
        return P()
    _, neg_axis = max(candidates)
    spec: list[str | None] = [None] * len(shape)
    spec[-neg_axis] = "fsdp"
    return P(*spec)


def param_shardings(tree: PyTree, mesh: Mesh, *, min_shard_size: int = 2**14) -> PyTree:
    """``NamedSharding`` for every array leaf of ``tree`` (params or optimizer state) by :func:`leaf_spec`.

    Leaves may be arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``); non-array leaves
    (``None``, Python scalars) get a replicated sharding.
    """
    fsdp = mesh.shape["fsdp"]

    def rule(x: Any) -> NamedSharding:
        shape = getattr(x, "shape", ())
        return NamedSharding(mesh, leaf_spec(shape, fsdp, min_shard_size=min_shard_size))

    return jax.tree.map(rule, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding for a batch ``(B, ...)``: ``B`` split over ``data`` and ``fsdp`` together, the rest whole."""
    return NamedSharding(mesh, P(AXES))


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


def any_process(flag: bool) -> bool:
    """True when ``flag`` is true on any process (e.g. "a signal arrived"), the same answer on all of them;
    a collective in a multi-process run."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def shard_pytree(tree: PyTree, shardings: PyTree) -> PyTree:
    """Place every leaf of ``tree`` (host or device arrays, identical on all processes) on its sharding."""

    def place(x: Any, s: NamedSharding) -> jax.Array:
        if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
            return jax.device_put(x, s)
        # A process-local value in a multi-process run: every process builds its own shards from it.
        return host_to_global(jax.device_get(x), s)

    return jax.tree.map(place, tree, shardings)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Start ``jax.distributed`` for multi-host runs; a no-op for a single process.

    Arguments left ``None`` are read from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. With ``auto=True`` and nothing given, JAX's cluster auto-detection (TPU pod slices,
    SLURM, Open MPI) fills them in. Must run before anything touches a JAX device. Returns True when
    ``jax.distributed`` was initialised by this call.
    """
    if coordinator_address is None:
        coordinator_address = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = _env_int("JAX_PROCESS_ID")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    given = (coordinator_address, num_processes, process_id)
    if all(v is None for v in given):
        if not auto:
            return False
        jax.distributed.initialize()
        return True
    if num_processes == 1 and coordinator_address is None:
        return False
    if any(v is None for v in given) and not auto:
        raise ValueError(
            "multi-process run needs coordinator_address, num_processes and process_id (flags or "
            f"JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); got {given}"
        )
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    _log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ValueError(
            f"environment variable {name} must be an integer, got {os.environ[name]!r}"
        ) from None
