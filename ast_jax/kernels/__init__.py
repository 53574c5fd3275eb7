"""Device kernels for compressed inference (Pallas, with plain-JAX fallbacks)."""

from ast_jax.kernels.nm_matmul import (
    NMWeight,
    nm_dense,
    nm_matmul,
    nm_matmul_pallas,
    nm_matmul_reference,
    to_kernel_layout,
)

__all__ = ["NMWeight", "nm_dense", "nm_matmul", "nm_matmul_pallas", "nm_matmul_reference", "to_kernel_layout"]
