"""GPT-2-style model: shapes, causality, remat equivalence, the module layout the sparse filter relies on."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ast_jax.models.gpt2 import GPT2, GPT2Config
from ast_jax.sparsify import path_str, sparse_paths

# Compilation dominates these tiny models on CPU; XLA's lowest backend optimisation level halves it.
FAST = {"xla_backend_optimization_level": 0}
CFG = GPT2Config(vocab_size=50, max_len=12, n_layer=2, n_head=2, d_model=16)


@pytest.fixture(scope="module")
def model_and_params():
    model = GPT2(CFG)
    params = jax.jit(model.init, compiler_options=FAST)(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))[
        "params"
    ]
    fwd = jax.jit(lambda p, t: model.apply({"params": p}, t, return_hidden=True), compiler_options=FAST)
    return model, params, fwd


def test_shapes_and_hidden_states(model_and_params):
    _, params, fwd = model_and_params
    tok = jax.random.randint(jax.random.key(1), (3, 12), 0, 50)
    logits, hidden = fwd(params, tok)
    chex.assert_shape(logits, (3, 12, 50))
    assert len(hidden) == CFG.n_layer + 1
    for h in hidden:
        chex.assert_shape(h, (3, 12, 16))
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_causal(model_and_params):
    _, params, fwd = model_and_params
    tok = jax.random.randint(jax.random.key(2), (1, 12), 0, 50)
    changed = tok.at[0, 7].set((tok[0, 7] + 1) % 50)
    a, _ = fwd(params, tok)
    b, _ = fwd(params, changed)
    np.testing.assert_allclose(np.asarray(a[0, :7]), np.asarray(b[0, :7]), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(a[0, 7:]), np.asarray(b[0, 7:]))


def test_block_linears_are_plain_dense_with_in_out_kernels(model_and_params):
    model, params, _ = model_and_params
    seen = []

    def hook(next_fun, args, kwargs, ctx):
        if isinstance(ctx.module, nn.Dense) and ctx.method_name == "__call__":
            seen.append(("/".join(ctx.module.path), args[0].shape[-1], ctx.module.features))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(hook):
        jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((1, 4), jnp.int32)), params)
    sparse = {path_str(p[:-1]) for p in sparse_paths(params)}
    assert {name for name, _, _ in seen} == sparse and len(sparse) == 6 * CFG.n_layer
    for name, d_in, d_out in seen:
        kernel = params
        for c in name.split("/"):
            kernel = kernel[c]
        assert kernel["kernel"].shape == (d_in, d_out)
    assert "lm_head" not in params  # tied embeddings


def test_remat_gives_same_outputs_and_gradients(model_and_params):
    _, params, _ = model_and_params
    # One block is enough to exercise nn.remat; fewer layers keep the two compilations cheap.
    cfg1 = GPT2Config(**{**CFG.__dict__, "n_layer": 1})
    p1 = {k: v for k, v in params.items() if k != "block_1"}
    tok = jax.random.randint(jax.random.key(3), (2, 12), 0, 50)

    def loss(m):
        f = jax.value_and_grad(lambda p: jnp.mean(m.apply({"params": p}, tok) ** 2))
        return jax.jit(f, compiler_options=FAST)(p1)

    remat = GPT2(GPT2Config(**{**cfg1.__dict__, "remat": True}))
    chex.assert_trees_all_close(loss(GPT2(cfg1)), loss(remat), rtol=1e-5, atol=1e-7)


def test_untied_head_and_bad_config():
    m = GPT2(GPT2Config(vocab_size=10, max_len=4, n_layer=1, n_head=1, d_model=8, tie_embeddings=False))
    p = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert p["lm_head"]["kernel"].shape == (8, 10)
    assert not any("lm_head" in path_str(x) for x in sparse_paths(p))
    with pytest.raises(ValueError, match="not divisible by n_head"):
        GPT2Config(d_model=10, n_head=4)
    with pytest.raises(ValueError, match="max_len"):
        jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 5), jnp.int32))
