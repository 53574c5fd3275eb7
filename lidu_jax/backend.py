"""Which implementation computes ``log P``: the rule, user tiles, and the one jitted core.

Two backends compute the same numbers (to float32 rounding) with different programs:

- ``"cpu"``: the estimators of `lidu_jax.reference` with the CPU fast ``log H`` of `lidu_jax.cpu_backend`,
  256 users per tile;
- ``"accelerator"``: the estimators of `lidu_jax.reference` as they are, their log Phi arrays materialised
  (``materialise=True``, what XLA's GPU compiler needs), 128 users per tile to bound that memory to
  ``128 * G * n * 4`` bytes (128 MiB for 256 cells and 1,000 items).

**The rule** (`resolve_backend`): an explicit ``backend=`` wins. Otherwise the platform of the devices that
hold the first concrete `jax.Array` among the inputs (``x.devices()``): ``"cpu"`` when they are all CPUs,
else ``"accelerator"``. With no concrete `jax.Array` (NumPy inputs, or tracers under `jax.jit` /
`jax.vmap`), the platform of the device new arrays go to: `jax.default_device` when set, else the first
device of the default platform. Under `jax.jit` that is where the computation runs unless its inputs are
committed elsewhere; pass ``backend=`` then.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from lidu_jax import cpu_backend, reference
from lidu_jax.validation import is_concrete

__all__ = ["BACKENDS", "default_device", "default_tile_size", "gaussian_log_prob", "resolve_backend"]

BACKENDS = ("cpu", "accelerator")


def default_device() -> jax.Device:
    """The device a new array goes to: `jax.default_device` (a device or a platform name) or the first
    device of the default platform."""
    dev = jax.config.jax_default_device
    if isinstance(dev, str):
        return jax.devices(dev)[0]
    return dev if dev is not None else jax.devices()[0]


def resolve_backend(backend: str | None, *arrays: Any) -> str:
    """``"cpu"`` or ``"accelerator"`` for inputs ``arrays`` (None entries allowed), by the module's rule."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        return backend
    for x in arrays:
        if isinstance(x, jax.Array) and is_concrete(x):
            return "cpu" if {d.platform for d in x.devices()} == {"cpu"} else "accelerator"
    return "cpu" if default_device().platform == "cpu" else "accelerator"


def default_tile_size(backend: str) -> int:
    """Users per tile inside one jitted call: 256 on ``"cpu"``, 128 on ``"accelerator"``.

    On a CPU the ``log H`` loop only holds ``(B, G)`` arrays and each user stops at its own floor; tiles of
    128 to 1,024 users measured within noise of each other on one core (256 was 5-7% faster than whole
    1,024-user chunks when a tile stopped at its lowest user's block). Elsewhere the ``(B, G, n)`` log Phi
    arrays are materialised, and 128 users bound that memory."""
    return 256 if backend == "cpu" else 128


def map_user_tiles(fn: Callable, tile_size: int, *arrays: jax.Array) -> jax.Array:
    """``fn`` over the leading (user) axis ``tile_size`` users at a time with `jax.lax.map` (0: all at once);
    the last tile is padded by repeating the last user and the padding dropped."""
    b = arrays[0].shape[0]
    if not tile_size or b <= tile_size:
        return fn(*arrays)
    n_tiles = -(-b // tile_size)
    pad = n_tiles * tile_size - b

    def split(x):
        if pad:
            x = jnp.concatenate([x, jnp.broadcast_to(x[-1:], (pad, *x.shape[1:]))])
        return x.reshape(n_tiles, tile_size, *x.shape[1:])

    out = jax.lax.map(lambda xs: fn(*xs), tuple(split(x) for x in arrays))
    return out.reshape(n_tiles * tile_size, *out.shape[2:])[:b]


@partial(
    jax.jit, static_argnames=("method", "ordered", "grid_size", "n_keep", "backend", "tile_size", "trim")
)
def gaussian_log_prob(
    mean: jax.Array,
    std: jax.Array,
    ranking: jax.Array,
    cand: jax.Array,
    *,
    method: str,
    ordered: bool,
    grid_size: int,
    n_keep: int | None,
    backend: str,
    tile_size: int,
    trim: bool = True,
) -> jax.Array:
    """`lidu_jax.reference.gaussian_log_prob` on ``backend``, ``tile_size`` users at a time: ``(B,)`` from
    standardised ``mean, std, cand (B, n)`` and ``ranking (B, K)``. ``trim`` (CPU only) leaves out each
    user's low cells where ``H <= e^-30 P`` (`lidu_jax.cpu_backend`)."""
    if backend == "cpu":
        how = dict(log_h=partial(cpu_backend.rest_log_h, trim=trim))
    else:
        how = dict(materialise=True)
    body = partial(
        reference.gaussian_log_prob, method=method, ordered=ordered, grid_size=grid_size, n_keep=n_keep, **how
    )
    return map_user_tiles(body, tile_size, mean, std, ranking, cand)
