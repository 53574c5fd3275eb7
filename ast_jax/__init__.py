"""AST: the Adaptive Sparse Trainer (2:4 semi-structured sparse retraining), in JAX.

The core is pure functions on arrays and pytrees: ``nm_mask`` (masks), ``sparse_adamw`` (Annealing SR-STE
AdamW as a chain of optax pieces: ``with_nm_masks`` keeps the masks, ``scale_by_srste_adam`` is the
decoupled moment update), ``masked_params`` (straight-through forward weights),
``kl_distill_loss`` (distillation), ``slorb_init`` (Sparse Low-Rank Boosting) and ``make_train_step`` (one
pure distillation step to ``jax.jit``). ``python -m ast_jax`` runs the small end-to-end comparison.
"""

from ast_jax.distill import (
    LossConfig,
    cross_entropy_loss,
    distill_loss,
    hidden_mse_loss,
    kl_distill_loss,
    reverse_kl_distill_loss,
)
from ast_jax.generate import generate
from ast_jax.mask_state import NMMaskState, refresh_masks, with_nm_masks
from ast_jax.masks import check_nm, flip_count, nm_mask, wanda_scores
from ast_jax.optim import (
    SparseAdamWState,
    annealing_decay,
    decay_mask,
    dense_adamw,
    get_masks,
    gpt2_recipe_schedule,
    mask_stats,
    sparse_adamw,
)
from ast_jax.slorb import apply_with_slorb, block_project, slorb_init, slorb_init_tree, slorb_layer
from ast_jax.sparsify import (
    apply_masks,
    collect_input_norms,
    compute_masks,
    default_sparse_filter,
    is_strict_nm,
    masked_params,
    sparse_paths,
    strict_nm_report,
    wanda_masks,
)
from ast_jax.srste import add_srste_decay, annealing_schedule, mask_updates, scale_by_srste_adam
from ast_jax.step import TrainState, evaluate_perplexity, final_params, init_train_state, make_train_step

__all__ = [
    "LossConfig",
    "NMMaskState",
    "SparseAdamWState",
    "TrainState",
    "add_srste_decay",
    "annealing_decay",
    "annealing_schedule",
    "apply_masks",
    "apply_with_slorb",
    "block_project",
    "check_nm",
    "collect_input_norms",
    "compute_masks",
    "cross_entropy_loss",
    "decay_mask",
    "default_sparse_filter",
    "dense_adamw",
    "distill_loss",
    "evaluate_perplexity",
    "final_params",
    "flip_count",
    "generate",
    "get_masks",
    "gpt2_recipe_schedule",
    "hidden_mse_loss",
    "init_train_state",
    "is_strict_nm",
    "kl_distill_loss",
    "make_train_step",
    "mask_stats",
    "mask_updates",
    "masked_params",
    "nm_mask",
    "refresh_masks",
    "reverse_kl_distill_loss",
    "scale_by_srste_adam",
    "slorb_init",
    "slorb_init_tree",
    "slorb_layer",
    "sparse_adamw",
    "sparse_paths",
    "strict_nm_report",
    "wanda_masks",
    "wanda_scores",
    "with_nm_masks",
]
