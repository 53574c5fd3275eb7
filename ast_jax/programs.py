"""The sharded side of an ``ast_jax.train`` run: its jitted programs, the pytree its checkpoints hold, and
the multi-process helpers (global batches, process-0 output; host copies and collectives are
:func:`ast_jax.sharding.to_host` / :func:`ast_jax.sharding.any_process`).

Every program is jitted with ``NamedSharding`` in/out shardings from :func:`ast_jax.sharding.param_shardings`
(FSDP over ``fsdp``, data parallel over ``data``); the student step is :func:`ast_jax.step.make_train_step`
with :func:`ast_jax.loop.build_optimizer`, the teacher step the same on
:func:`ast_jax.loop.build_teacher_optimizer` with the CE loss. Programs are cached per settings and mesh, so a
resumed run in the same process compiles nothing again.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ast_jax import sharding as shd
from ast_jax.data import batch_at
from ast_jax.distill import distill_loss
from ast_jax.loop import CE_ONLY, build_gpt2, build_optimizer, build_teacher_optimizer
from ast_jax.models.gpt2 import GPT2
from ast_jax.optim import get_masks
from ast_jax.slorb import apply_with_slorb, slorb_init_tree
from ast_jax.sparsify import apply_masks, compute_masks
from ast_jax.step import TrainState, init_train_state, make_train_step

if TYPE_CHECKING:
    from ast_jax.train import TrainConfig

__all__ = [
    "Programs",
    "build_model",
    "checkpoint_target",
    "checkpoint_tree",
    "programs",
    "state_from_checkpoint_tree",
]

# Settings that never reach a compiled program: runs differing only in these share compilations.
NOT_COMPILED = (
    "mesh", "coordinator_address", "num_processes", "process_id", "text", "max_bytes", "checkpoint_dir",
    "save_every", "keep", "restart", "allow_optimizer_change", "loss_spike", "log_every", "progress",
    "eval_windows", "export_dir", "export_bits", "export_format", "json", "log_dir",
)  # fmt: skip


def build_model(cfg: TrainConfig) -> Any:
    """The teacher and student architecture of a :class:`TrainConfig`: the byte-level GPT-2-style model, or
    the architecture of the pretrained ``--model`` (with ``--remat`` applied)."""
    if cfg.model.model is None:
        return build_gpt2(cfg.model, 256, cfg.data.seq_len)
    from ast_jax.model_source import pretrained

    model = pretrained(cfg.model.model).model
    if cfg.data.seq_len > model.cfg.max_len:
        raise ValueError(
            f"--seq-len {cfg.data.seq_len} exceeds the context of --model {cfg.model.model} "
            f"({model.cfg.max_len} tokens)"
        )
    return type(model)(dataclasses.replace(model.cfg, remat=cfg.model.remat))


def pretrained_tokenizer(cfg: TrainConfig) -> Any:
    """The tokenizer of ``--model`` (``None`` for the byte-level model: its tokens are bytes)."""
    if cfg.model.model is None:
        return None
    from ast_jax.model_source import pretrained

    tok = pretrained(cfg.model.model).tokenizer
    if tok is None:
        raise ValueError(f"--model {cfg.model.model}: no tokenizer found beside the model")
    return tok


def initial_params(cfg: TrainConfig, progs: Programs) -> Any:
    """The teacher's starting params with the run's shardings: the pretrained ``--model`` weights, or a
    fresh init of the byte-level model from ``--seed``."""
    if cfg.model.model is None:
        return progs.init(jax.random.key(cfg.run.seed))
    from ast_jax.model_source import pretrained

    params = pretrained(cfg.model.model).params
    return jax.tree.map(lambda x, s: shd.host_to_global(np.asarray(x, np.float32), s), params, progs.psh)


def checkpoint_tree(state: TrainState) -> dict[str, Any]:
    """The pytree a checkpoint stores: ``{"params", "opt_state", "step", "data_position"}``.

    Use ``jax.eval_shape(checkpoint_tree, state)`` to build a restore target.
    """
    return {
        "params": state.params,
        "opt_state": state.opt_state,
        "step": state.step,
        "data_position": state.data_position,
    }


def state_from_checkpoint_tree(tree: dict[str, Any]) -> TrainState:
    """Inverse of :func:`checkpoint_tree`."""
    return TrainState(
        params=tree["params"],
        opt_state=tree["opt_state"],
        step=tree["step"],
        data_position=tree["data_position"],
    )


def all_finite(tree: Any) -> jax.Array:
    """One boolean: no float leaf of ``tree`` holds NaN or inf (integer and bool leaves always pass)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


class Programs(NamedTuple):
    """The jitted functions of one run, with their shardings."""

    model: Any  # GPT2, or the architecture of --model
    psh: Any  # NamedSharding pytree of the model params (teacher and student)
    ssh: Any  # NamedSharding pytree of the student TrainState
    bsh: Any  # NamedSharding of a batch
    init: Any  # key -> params
    make_state: Any  # teacher params -> student TrainState
    step: Any  # (state, batch, teacher params) -> (state, metrics)
    probe: Any  # (state, batch, teacher params) -> (params and opt state finite, loss of the state's params)
    teacher_state: Any  # params -> teacher TrainState (None without teacher training)
    teacher_step: Any  # (state, batch) -> (state, metrics)
    teacher_params: Any  # teacher TrainState -> (params, params finite)


def programs(cfg: TrainConfig, mesh: Any) -> Programs:
    """Jitted programs for ``cfg`` on ``mesh``; calling it again in the same process with settings that
    differ only in :data:`NOT_COMPILED` fields (e.g. to resume) reuses them without recompiling."""
    key = cfg.replace(**{f: v for f, v in type(cfg).default_flags().items() if f in NOT_COMPILED})
    return _build_programs(key, mesh)


def _student_parts(cfg: TrainConfig) -> tuple[GPT2, Any, optax.GradientTransformation, Any, Any]:
    """``(model, init_fn, tx, make_state, abstract_params)`` of a run: plain functions, nothing compiled."""
    model = build_model(cfg)
    dummy = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    init_fn = lambda key: model.init(key, dummy)["params"]
    sp = cfg.sparsity
    tx = build_optimizer(cfg.optimizer, sp, cfg.run.steps, variant=cfg.run.variant)

    def make_state(teacher_params: Any) -> TrainState:
        slorb = None
        if cfg.run.slorb:
            slorb = slorb_init_tree(teacher_params, compute_masks(teacher_params, sp.n, sp.m), sp.slorb_k)
        return init_train_state(teacher_params, tx, slorb_params=slorb)

    return model, init_fn, tx, make_state, jax.eval_shape(init_fn, jax.random.key(0))


def checkpoint_target(cfg: TrainConfig, mesh: Any) -> Any:
    """``jax.ShapeDtypeStruct`` pytree (with shardings) of ``checkpoint_tree`` of the student state: the
    restore target, built by tracing only (a refused resume compiles nothing)."""
    _, _, _, make_state, abstract_params = _student_parts(cfg)
    shapes = jax.eval_shape(lambda p: checkpoint_tree(make_state(p)), abstract_params)
    shardings = shd.param_shardings(shapes, mesh, min_shard_size=cfg.parallel.min_shard_size)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


@functools.lru_cache(maxsize=4)
def _build_programs(cfg: TrainConfig, mesh: Any) -> Programs:
    model, init_fn, tx, make_state, abstract_params = _student_parts(cfg)
    rule = functools.partial(shd.param_shardings, mesh=mesh, min_shard_size=cfg.parallel.min_shard_size)
    bsh = shd.batch_sharding(mesh)
    rep = shd.replicated(mesh)
    psh = rule(abstract_params)
    ssh = rule(jax.eval_shape(make_state, abstract_params))
    loss_cfg = cfg.loss.loss()
    step = jax.jit(
        make_train_step(model, None, tx, loss_cfg),
        in_shardings=(ssh, bsh, psh),
        out_shardings=(ssh, rep),
        donate_argnums=0,
    )

    def probe(state: TrainState, batch: dict[str, jax.Array], teacher_params: Any) -> tuple[Any, Any]:
        # The step reports the loss of the params it started from; a save needs the loss of the params it
        # writes, so an update that exploded (finite but huge weights) is caught before it reaches the disk.
        fwd = apply_masks(state.params, get_masks(state.opt_state))
        logits = apply_with_slorb(model, fwd["model"], fwd.get("slorb"), batch["inputs"])
        t_logits = (
            model.apply({"params": teacher_params}, batch["inputs"]) if loss_cfg.needs_teacher else None
        )
        loss, _ = distill_loss(logits, batch["targets"], loss_cfg, t_logits)
        return all_finite((state.params, state.opt_state)), loss

    teacher_state = teacher_step = teacher_params = None
    if cfg.teacher.steps:
        ttx = build_teacher_optimizer(cfg.optimizer, cfg.teacher)
        t_state = lambda p: init_train_state(p, ttx)
        tsh = rule(jax.eval_shape(t_state, abstract_params))
        teacher_state = jax.jit(t_state, in_shardings=(psh,), out_shardings=tsh)
        teacher_step = jax.jit(
            make_train_step(model, None, ttx, CE_ONLY),
            in_shardings=(tsh, bsh),
            out_shardings=(tsh, rep),
            donate_argnums=0,
        )
        teacher_params = jax.jit(
            lambda st: (st.params["model"], all_finite(st.params)),
            in_shardings=(tsh,),
            out_shardings=(psh, rep),
        )
    return Programs(
        model=model,
        psh=psh,
        ssh=ssh,
        bsh=bsh,
        init=jax.jit(init_fn, out_shardings=psh),
        make_state=jax.jit(make_state, in_shardings=(psh,), out_shardings=ssh),
        step=step,
        probe=jax.jit(probe, in_shardings=(ssh, bsh, psh), out_shardings=(rep, rep)),
        teacher_state=teacher_state,
        teacher_step=teacher_step,
        teacher_params=teacher_params,
    )


# ---------------------------------------------------------------------------------------------------------
# Processes and host arrays


def init_distributed(cfg: TrainConfig) -> None:
    """``jax.distributed`` start-up from the parallel settings (flags or the usual environment variables)."""
    from jax._src import distributed as _dist

    p = cfg.parallel
    if _dist.global_state.client is None:  # idempotent: main() or a notebook may have started it already
        shd.initialize_distributed(p.coordinator_address, p.num_processes, p.process_id)


def global_batch(tokens: np.ndarray, position: int, cfg: TrainConfig, seed_offset: int, sharding) -> Any:
    """Training batch ``position`` (:func:`ast_jax.data.batch_at`, seed ``seed + seed_offset``) as global
    arrays with ``sharding``; every process builds the same host batch and keeps its own shards."""
    d = cfg.data
    b = batch_at(tokens, position, d.batch_size, d.seq_len, seed=cfg.run.seed + seed_offset)
    return {k: shd.host_to_global(v, sharding) for k, v in b.items()}


def say(msg: str) -> None:
    """Print on process 0 only."""
    if jax.process_index() == 0:
        print(msg, flush=True)
