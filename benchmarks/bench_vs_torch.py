"""Speed of ``ast_jax`` against PyTorch anchors, side by side in one process (issue 15).

Three comparisons, each checked for equal results before it is timed; repetitions alternate between the two
sides and the medians are compared (ours/torch > 1 means ours is faster):

1. ``step``: one AST training step of the same GPT-2-style model and batch. Ours: ``make_train_step`` with
   ``sparse_adamw`` (2:4 masks refreshed every 10 steps, annealing SR-STE, decoupled weight decay) and the
   0.67 KL + 0.33 CE loss against the dense teacher (``ast_jax.distill``), jitted with the state donated.
   Torch: a nanoGPT-style model written here (fused ``c_attn``, pre-LN, tanh-GELU MLP,
   ``F.scaled_dot_product_attention`` causal attention, tied embeddings), 2:4 masks = per-group top-2 of
   ``|W|`` over groups of 4 consecutive inputs refreshed every 10 steps, forward on ``M * W`` with a
   straight-through gradient to ``W``, AdamW, and the teacher forward under ``torch.no_grad``.
   ``--srste coupled`` (the authors' form): ``g <- g + lambda(t) (1 - M) W`` added to the gradient in the
   backward of the masking function, then ``torch.optim.AdamW``; ours is then ``sparse_adamw(variant=
   "coupled")``. ``--srste decoupled`` (default, what ``python -m ast_jax`` trains with): ours is
   ``sparse_adamw`` (``variant="annealing"``), torch a hand-written AdamW with the same decoupled SR-STE
   moments. ``lambda(t) = lambda_max min(t / T0, 1)`` on both sides. Check: our initial params copied into
   torch, the losses of the first steps (a mask refresh included) agree within ``--step-rtol``.
   Reported: tokens/s ratio.
2. ``sparsegpt``: SparseGPT 2:4 (block 128, 1% dampening) of the 7 linear layers of SmolLM2-135M's block 0
   with the same calibration Hessians (``XᵀX`` of the layer inputs of ``--calib-seqs x --calib-len``
   WikiText-2 tokens). Ours: ``ast_jax.oneshot.sparsegpt_prune`` jitted per layer (compilation excluded,
   reported). Torch: the reference algorithm (Cholesky of the damped inverse Hessian, column blocks, mask
   of every 4 columns by ``w^2 / d^2``, error feedback, as in the authors' ``fasterprune``). Check: the
   layer reconstruction errors ``tr(dW^T H dW)`` agree within 1%. Reported: seconds ratio over the 7 layers.
3. ``decode``: greedy decoding of SmolLM2-135M (dense, or ``--decode-model magnitude`` for a 2:4 model) at
   batch 1 and ``--decode-batch``: ours ``ast_jax.generate.generate`` vs ``transformers`` ``generate(
   do_sample=False)`` on our float32 HF export. Check: identical tokens. Reported: tokens/s ratio per batch
   size (our compile time excluded, reported separately).

    python benchmarks/bench_vs_torch.py --quick          # smoke: tiny sizes, few repetitions
    python benchmarks/bench_vs_torch.py --json vs_torch.json
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ast_jax.distill import LossConfig
from ast_jax.models.gpt2 import GPT2, GPT2Config
from ast_jax.optim import sparse_adamw
from ast_jax.step import init_train_state, make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _sync(x: Any) -> Any:
    return jax.block_until_ready(x)


def _interleaved(fns: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    """Call each function once per round, in alternating order, and return the wall times."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return times


# -------------------------------------------------------------------------------------------------------
# 1. Training step
# -------------------------------------------------------------------------------------------------------


class _MaskST(torch.autograd.Function):
    """Forward ``M * W``; backward straight through to ``W``, plus ``lam (1 - M) W`` when ``lam`` (a 0-d
    tensor, so ``torch.compile`` does not specialise on its value) is given (coupled SR-STE)."""

    @staticmethod
    def forward(ctx, w, mask, lam):
        ctx.save_for_backward(w, mask, lam)
        ctx.coupled = lam is not None
        return w * mask

    @staticmethod
    def backward(ctx, g):
        w, mask, lam = ctx.saved_tensors
        if ctx.coupled:
            g = g + lam * (1.0 - mask) * w
        return g, None, None


class TorchGPT(torch.nn.Module):
    """nanoGPT-style decoder with the sizes of our ``GPT2Config`` and 2:4-masked block linears."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        d, v = cfg.d_model, cfg.vocab_size
        self.cfg = cfg
        self.wte = torch.nn.Parameter(torch.zeros(v, d))
        self.wpe = torch.nn.Parameter(torch.zeros(cfg.max_len, d))
        self.blocks = torch.nn.ModuleList()
        for _ in range(cfg.n_layer):
            b = torch.nn.Module()
            b.ln_1 = torch.nn.LayerNorm(d, eps=cfg.layer_norm_eps)
            b.c_attn = torch.nn.Linear(d, 3 * d)
            b.c_proj = torch.nn.Linear(d, d)
            b.ln_2 = torch.nn.LayerNorm(d, eps=cfg.layer_norm_eps)
            b.c_fc = torch.nn.Linear(d, cfg.mlp_dim)
            b.mlp_proj = torch.nn.Linear(cfg.mlp_dim, d)
            self.blocks.append(b)
        self.ln_f = torch.nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.masks: dict[str, torch.Tensor] = {}  # name of a sparse weight -> float {0, 1} mask
        self.coupled = False  # add the SR-STE decay lam * (1 - M) * W to the gradient (authors' form)
        self.lam = torch.zeros(())  # lambda(t) of the current step, updated in place

    def sparse_weights(self) -> dict[str, torch.nn.Parameter]:
        return {
            f"{i}.{n}": getattr(b, n).weight
            for i, b in enumerate(self.blocks)
            for n in ("c_attn", "c_proj", "c_fc", "mlp_proj")
        }

    @torch.no_grad()
    def refresh_masks(self) -> None:
        """2:4 masks: top-2 |W| of every 4 consecutive inputs of each output (torch layout (out, in))."""
        for name, w in self.sparse_weights().items():
            out, inp = w.shape
            g = w.abs().reshape(out, inp // 4, 4)
            idx = torch.topk(g, 2, dim=-1).indices
            self.masks[name] = torch.zeros_like(g).scatter_(-1, idx, 1.0).reshape(out, inp)

    def _lin(self, x, lin, name, sparse):
        if not sparse:
            return F.linear(x, lin.weight, lin.bias)
        w = _MaskST.apply(lin.weight, self.masks[name], self.lam if self.coupled else None)
        return F.linear(x, w, lin.bias)

    def forward(self, idx, sparse: bool = True):
        b, t = idx.shape
        d, h = self.cfg.d_model, self.cfg.n_head
        x = self.wte[idx] + self.wpe[:t][None]
        for i, blk in enumerate(self.blocks):
            y = self._lin(blk.ln_1(x), blk.c_attn, f"{i}.c_attn", sparse)
            q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in y.split(d, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self._lin(y.transpose(1, 2).reshape(b, t, d), blk.c_proj, f"{i}.c_proj", sparse)
            y = F.gelu(self._lin(blk.ln_2(x), blk.c_fc, f"{i}.c_fc", sparse), approximate="tanh")
            x = x + self._lin(y, blk.mlp_proj, f"{i}.mlp_proj", sparse)
        return F.linear(self.ln_f(x), self.wte)


@torch.no_grad()
def load_from_flax(tm: TorchGPT, p: Any) -> None:
    """Copy our GPT2 params (kernels ``(in, out)``) into the torch model (weights ``(out, in)``)."""
    t = lambda a: torch.from_numpy(np.array(a, np.float32))
    tm.wte.copy_(t(p["wte"]["embedding"]))
    tm.wpe.copy_(t(p["wpe"]["embedding"]))
    for i, blk in enumerate(tm.blocks):
        bp = p[f"block_{i}"]
        a = bp["attn"]
        blk.c_attn.weight.copy_(torch.cat([t(a[n]["kernel"]).T for n in ("q", "k", "v")], 0))
        blk.c_attn.bias.copy_(torch.cat([t(a[n]["bias"]) for n in ("q", "k", "v")], 0))
        for lin, src in (
            (blk.c_proj, a["proj"]),
            (blk.c_fc, bp["mlp"]["fc"]),
            (blk.mlp_proj, bp["mlp"]["proj"]),
        ):
            lin.weight.copy_(t(src["kernel"]).T)
            lin.bias.copy_(t(src["bias"]))
        for ln, src in ((blk.ln_1, bp["ln_1"]), (blk.ln_2, bp["ln_2"])):
            ln.weight.copy_(t(src["scale"]))
            ln.bias.copy_(t(src["bias"]))
    tm.ln_f.weight.copy_(t(p["ln_f"]["scale"]))
    tm.ln_f.bias.copy_(t(p["ln_f"]["bias"]))


class DecoupledSrsteAdamW:
    """AdamW whose sparse weights use ``u = m + lam (1 - M) W`` and ``v`` on ``u^2`` (``ast_jax.srste``)."""

    def __init__(self, params, sparse_ids, lr, b1, b2, eps, wd):
        self.params = list(params)
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, wd
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.sparse_ids = sparse_ids  # id(param) -> mask name
        self.t = 0

    @torch.no_grad()
    def step(self, masks: dict[str, torch.Tensor], lam: float) -> None:
        self.t += 1
        bc1, bc2 = 1.0 - self.b1**self.t, 1.0 - self.b2**self.t
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            g = p.grad
            m.mul_(self.b1).add_(g, alpha=1.0 - self.b1)
            name = self.sparse_ids.get(id(p))
            # Dense leaves: plain Adam (v on g^2); sparse kernels: v on u^2.
            u = m if name is None else m + lam * (1.0 - masks[name]) * p
            s = g if name is None else u
            v.mul_(self.b2).addcmul_(s, s, value=1.0 - self.b2)
            upd = (u / bc1) / ((v / bc2).sqrt_() + self.eps)
            if p.ndim >= 2:
                upd.add_(p, alpha=self.wd)
            p.add_(upd, alpha=-self.lr)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


class TorchASTStep:
    """The authors' AST step in PyTorch: masked student forward, dense teacher under no_grad, KL + CE."""

    def __init__(self, cfg, params, *, lr, max_decay, ramp, mask_every, b2, wd, srste, compile_model):
        self.student, self.teacher = TorchGPT(cfg), TorchGPT(cfg)
        load_from_flax(self.student, params)
        load_from_flax(self.teacher, params)
        self.teacher.requires_grad_(False)
        self.student.refresh_masks()
        self.student.coupled = srste == "coupled"
        self.max_decay, self.ramp, self.mask_every, self.srste = max_decay, ramp, mask_every, srste
        self.t = 0
        ps = list(self.student.parameters())
        if srste == "coupled":
            decay = [p for p in ps if p.ndim >= 2]
            rest = [p for p in ps if p.ndim < 2]
            groups = [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]
            self.opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, b2), eps=1e-8)
        else:
            ids = {id(w): n for n, w in self.student.sparse_weights().items()}
            self.opt = DecoupledSrsteAdamW(ps, ids, lr, 0.9, b2, 1e-8, wd)
        self.loss_cfg = LossConfig()
        self.fwd = self._loss
        if compile_model:
            self.fwd = torch.compile(self._loss)

    def _loss(self, x, y):
        c = self.loss_cfg
        with torch.no_grad():
            tl = self.teacher(x, sparse=False)
        sl = self.student(x)
        v = sl.shape[-1]
        ce = F.cross_entropy(sl.reshape(-1, v), y.reshape(-1))
        tt = c.temperature
        ls = F.log_softmax(sl.reshape(-1, v) / tt, -1)
        lt = F.log_softmax(tl.reshape(-1, v) / tt, -1)
        kl = F.kl_div(ls, lt, reduction="batchmean", log_target=True) * tt**2
        return c.w_kl * kl + c.w_ce * ce

    def __call__(self, x, y) -> torch.Tensor:
        self.t += 1
        lam = self.max_decay * min(self.t / self.ramp, 1.0) if self.ramp > 0 else self.max_decay
        self.student.lam.fill_(lam)
        loss = self.fwd(x, y)
        loss.backward()
        if self.srste == "coupled":
            self.opt.step()
        else:
            self.opt.step(self.student.masks, lam)
        self.opt.zero_grad()
        if self.t % self.mask_every == 0:
            self.student.refresh_masks()
        return loss


def bench_step(cfg: GPT2Config, batch: int, steps: int, rounds: int, a) -> dict:
    model = GPT2(cfg)
    teacher = model.init(jax.random.key(0), jnp.zeros((1, cfg.max_len), jnp.int32))["params"]
    hyper = {"lr": 1e-3, "max_decay": 2e-2, "ramp": 50, "mask_every": 10, "b2": 0.99, "wd": 0.1}
    variant = "annealing" if a.srste == "decoupled" else "coupled"
    tx = sparse_adamw(
        hyper["lr"],
        max_decay=hyper["max_decay"],
        ramp_steps=hyper["ramp"],
        mask_every=hyper["mask_every"],
        b2=hyper["b2"],
        weight_decay=hyper["wd"],
        variant=variant,
    )
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, (steps, batch, cfg.max_len + 1))
    jb = [
        {"inputs": jnp.asarray(s[:, :-1], jnp.int32), "targets": jnp.asarray(s[:, 1:], jnp.int32)}
        for s in toks
    ]
    tb = [(torch.from_numpy(s[:, :-1]).long(), torch.from_numpy(s[:, 1:]).long()) for s in toks]
    step = jax.jit(make_train_step(model, teacher, tx, LossConfig()), donate_argnums=0)
    kinds = {"off": ["torch"], "on": ["torch_compiled"], "both": ["torch", "torch_compiled"]}[a.torch_compile]
    make_ref = lambda kind: TorchASTStep(
        cfg, teacher, **hyper, srste=a.srste, compile_model=kind == "torch_compiled"
    )

    # Equivalence: same init, same batches, losses of the first steps (a mask refresh included).
    n_check = min(steps, 12)
    state = init_train_state(teacher, tx)
    ours_l = []
    for i in range(n_check):
        state, met = step(state, jb[i])
        ours_l.append(float(met["loss"]))
    worst = 0.0
    for kind in kinds:
        ref = make_ref(kind)
        torch_l = [float(ref(*tb[i]).detach()) for i in range(n_check)]
        rel = [abs(o - t) / abs(t) for o, t in zip(ours_l, torch_l, strict=True)]
        print(f"[step] check, losses of steps 1..{n_check} (ours / {kind}):")
        for i, (o, t, r) in enumerate(zip(ours_l, torch_l, rel, strict=True)):
            print(f"    step {i + 1:2d}: {o:.6f} / {t:.6f}  rel {r:.1e}")
        if rel[0] > 1e-4 or max(rel) > a.step_rtol:
            raise AssertionError(f"training step: losses differ from {kind} (rel {max(rel):.2e})")
        worst = max(worst, *rel)

    # Timing: fresh states (compiled above), blocks of `steps` steps (a multiple of 10: same refresh count).
    box = [init_train_state(teacher, tx)]

    def run_ours():
        s = box[0]
        for b in jb:
            s, _ = step(s, b)
        box[0] = _sync(s)

    fns, warm = {"ours": run_ours}, {}
    for kind in kinds:
        ref = make_ref(kind)
        t = time.perf_counter()
        for b in tb[:2]:
            ref(*b)  # warm-up (and torch.compile's compilation)
        warm[kind] = time.perf_counter() - t
        fns[kind] = lambda ref=ref: [ref(*b) for b in tb]
    run_ours()  # warm-up
    times = _interleaved(fns, rounds)
    med = {k: statistics.median(v) / steps for k, v in times.items()}
    tok = batch * cfg.max_len
    out = {
        "model": {"n_layer": cfg.n_layer, "d_model": cfg.d_model, "seq_len": cfg.max_len, "batch": batch},
        "srste": a.srste,
        "torch_compile": a.torch_compile,
        "check_max_rel_loss_diff": worst,
        "ours_ms_per_step": 1e3 * med["ours"],
        "ours_tokens_per_s": tok / med["ours"],
    }
    for kind in kinds:
        out[f"{kind}_warmup_s"] = warm[kind]
        out[f"{kind}_ms_per_step"] = 1e3 * med[kind]
        out[f"{kind}_tokens_per_s"] = tok / med[kind]
        out[f"ratio_vs_{kind}"] = med[kind] / med["ours"]
    out["ratio"] = out[f"ratio_vs_{kinds[0]}"]
    return out


# -------------------------------------------------------------------------------------------------------
# 2. SparseGPT
# -------------------------------------------------------------------------------------------------------


@torch.no_grad()
def torch_sparsegpt(w: torch.Tensor, h: torch.Tensor, prunen=2, prunem=4, blocksize=128, percdamp=0.01):
    """The reference SparseGPT N:M pass (``fasterprune``) on ``w`` (out, in) with ``h = XᵀX`` (in, in)."""
    W = w.clone().float()
    H = h.clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(cols)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w_ = W1[:, i]
            d = Hinv1[i, i]
            if i % prunem == 0:
                tmp = W1[:, i : i + prunem] ** 2 / (torch.diag(Hinv1)[i : i + prunem].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w_.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w_ - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def _smollm2_block0_hessians(seqs: int, seq_len: int, data_dir: pathlib.Path):
    from ast_jax.model_source import load_model
    from ast_jax.oneshot import _capture_inputs, accumulate_stats, blockwise_for, init_stats
    from ast_jax.tokenizer import encode

    loaded = load_model("", max_layers=1)
    model, params, tok = loaded.model, loaded.params, loaded.tokenizer
    valid = encode(tok, (data_dir / "text" / "wikitext-2" / "valid.txt").read_text(encoding="utf-8"))
    starts = np.random.default_rng(0).integers(0, len(valid) - seq_len, size=seqs)
    calib = jnp.asarray(np.stack([valid[s : s + seq_len] for s in starts]).astype(np.int32))
    bw = blockwise_for(model)
    bp = params[bw.block_names[0]]

    @jax.jit
    def stats(h):
        _, inputs, _ = _capture_inputs(bw.block, bp, h)
        return {k: accumulate_stats(init_stats(x.shape[-1], hessian=True), x).xtx for k, x in inputs.items()}

    hess: dict = {}
    for c in range(0, seqs, 4):
        part = stats(jax.jit(bw.embed)(params, calib[c : c + 4]))
        hess = part if not hess else {k: hess[k] + part[k] for k in hess}
    layers = {}
    for path, hm in hess.items():  # paths inside the block, e.g. ("attn", "q_proj")
        sub = bp
        for c in path:
            sub = sub[c]
        layers["/".join(path)] = (sub["kernel"], hm)
    return layers


def bench_sparsegpt(seqs: int, seq_len: int, rounds: int, data_dir: pathlib.Path) -> dict:
    from ast_jax.oneshot import reconstruction_error, sparsegpt_prune

    layers = _smollm2_block0_hessians(seqs, seq_len, data_dir)
    ours_fn = jax.jit(functools.partial(sparsegpt_prune, n=2, m=4, blocksize=128, damp=0.01))
    t = time.perf_counter()
    ours_out = {k: _sync(ours_fn(w, h)) for k, (w, h) in layers.items()}  # compiles each shape
    compile_s = time.perf_counter() - t
    th = {
        k: (torch.from_numpy(np.array(w).T.copy()), torch.from_numpy(np.array(h)))
        for k, (w, h) in layers.items()
    }
    torch_out = {k: torch_sparsegpt(w, h) for k, (w, h) in th.items()}
    rows = []
    print(f"[sparsegpt] check, SmolLM2 block 0, {seqs}x{seq_len} tokens: reconstruction error ours / torch")
    for k, (w, h) in layers.items():
        eo = float(reconstruction_error(w, ours_out[k][0], h))
        et = float(reconstruction_error(w, jnp.asarray(torch_out[k].numpy().T), h))
        rel = abs(eo - et) / et
        sparse_ok = bool(np.all(np.asarray(ours_out[k][0]).reshape(-1, 4, w.shape[1]).__ne__(0).sum(1) <= 2))
        rows.append({"layer": k, "shape": list(w.shape), "ours": eo, "torch": et, "rel_diff": rel})
        print(f"    {k:14s} {tuple(w.shape)!s:12s} {eo:14.6g} / {et:14.6g}  rel {rel:.2e}  2:4 {sparse_ok}")
        if rel > 0.01 or not sparse_ok:
            raise AssertionError(f"sparsegpt {k}: reconstruction errors differ by {rel:.2%} (> 1%)")

    def run_ours():
        for w, h in layers.values():
            _sync(ours_fn(w, h))

    def run_torch():
        for w, h in th.values():
            torch_sparsegpt(w, h)

    times = _interleaved({"ours": run_ours, "torch": run_torch}, rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "calibration": [seqs, seq_len],
        "layers": rows,
        "ours_compile_s": compile_s,
        "ours_s": med["ours"],
        "torch_s": med["torch"],
        "ratio": med["torch"] / med["ours"],
    }


# -------------------------------------------------------------------------------------------------------
# 3. Decoding
# -------------------------------------------------------------------------------------------------------


def bench_decode(batches: list[int], prompt_len: int, new: int, rounds: int, a) -> dict:
    import transformers

    from ast_jax.export_cli import export_model
    from ast_jax.generate import generate
    from ast_jax.model_source import load_model
    from ast_jax.tokenizer import encode

    loaded = load_model("")
    model, params, tok = loaded.model, loaded.params, loaded.tokenizer
    if a.decode_model == "magnitude":
        from ast_jax.sparsify import apply_masks, compute_masks

        params = apply_masks(params, compute_masks(params, 2, 4))
    valid = encode(tok, (a.data_dir / "text" / "wikitext-2" / "valid.txt").read_text(encoding="utf-8"))
    starts = np.random.default_rng(1).integers(0, len(valid) - prompt_len, size=max(batches))
    prompts = np.stack([valid[s : s + prompt_len] for s in starts]).astype(np.int32)
    with tempfile.TemporaryDirectory() as d:
        export_model(model, params, d, format="hf", tokenizer=tok, dtype="float32")
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # always `new` tokens, as ours with eos_id=None
    pad = 0

    results = []
    for b in batches:
        p_np = prompts[:b]
        p_t = torch.from_numpy(p_np).long()
        att = torch.ones_like(p_t)

        def ours(p_np=p_np):
            return np.asarray(_sync(generate(model, params, p_np, max_new_tokens=new).tokens))

        @torch.inference_mode()
        def theirs(p_t=p_t, att=att):
            out = hf.generate(p_t, attention_mask=att, max_new_tokens=new, do_sample=False, pad_token_id=pad)
            return out[:, prompt_len:].numpy()

        t = time.perf_counter()
        first = ours()
        first_s = time.perf_counter() - t
        t = time.perf_counter()
        ours()
        steady = time.perf_counter() - t
        ref = theirs()
        same = bool(np.array_equal(first, ref))
        print(f"[decode] check, batch {b}: same greedy tokens {same}")
        if not same:
            bad = np.argwhere(first != ref)
            raise AssertionError(f"decode batch {b}: tokens differ first at (row, step) {bad[0].tolist()}")
        times = _interleaved({"ours": ours, "torch": theirs}, rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        results.append(
            {
                "batch": b,
                "ours_compile_s": max(first_s - steady, 0.0),
                "ours_s": med["ours"],
                "torch_s": med["torch"],
                "ours_tokens_per_s": b * new / med["ours"],
                "torch_tokens_per_s": b * new / med["torch"],
                "ratio": med["torch"] / med["ours"],
            }
        )
    return {"model": a.decode_model, "prompt_len": prompt_len, "new_tokens": new, "batches": results}


# -------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="step,sparsegpt,decode", help="comma-separated: step,sparsegpt,decode")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions (smoke test)")
    p.add_argument(
        "--reps", type=int, default=0, help="interleaved repetitions per side (default 5, quick 2)"
    )
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--srste", choices=("decoupled", "coupled"), default="decoupled", help="SR-STE form")
    p.add_argument(
        "--torch-compile",
        choices=("off", "on", "both"),
        default="off",
        help="step: torch.compile the torch loss function (both: time eager and compiled torch)",
    )
    p.add_argument("--step-rtol", type=float, default=1e-3, help="loss tolerance over the checked steps")
    p.add_argument("--calib-seqs", type=int, default=16, help="SparseGPT calibration sequences")
    p.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--decode-model", choices=("dense", "magnitude"), default="dense")
    p.add_argument("--decode-batch", type=int, default=16)
    p.add_argument("--data-dir", type=pathlib.Path, default=ROOT.parent / "shared" / "data")
    a = p.parse_args(argv)
    parts = [x for x in a.parts.split(",") if x]
    for x in parts:
        if x not in ("step", "sparsegpt", "decode"):
            p.error(f"--parts: unknown part {x!r}")
    reps = a.reps or (2 if a.quick else 5)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(
        f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    res: dict[str, Any] = {"quick": a.quick, "reps": reps, "threads": a.threads}

    def save() -> None:  # after every part, so a failed later part keeps the numbers already measured
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=2)

    if "step" in parts:
        if a.quick:
            res["step"] = bench_step(GPT2Config(n_layer=1, d_model=64, n_head=2, max_len=32), 4, 20, reps, a)
        else:
            res["step"] = bench_step(
                GPT2Config(n_layer=4, d_model=256, n_head=4, max_len=128), 16, 20, reps, a
            )
        save()
    if "sparsegpt" in parts:
        seqs, seq_len = (2, 128) if a.quick else (a.calib_seqs, a.calib_len)
        res["sparsegpt"] = bench_sparsegpt(seqs, seq_len, reps, a.data_dir)
        save()
    if "decode" in parts:
        if a.quick:
            res["decode"] = bench_decode([1, 4], 16, 8, reps, a)
        else:
            res["decode"] = bench_decode([1, a.decode_batch], 16, 32, reps, a)
        save()

    print(
        "\nratio = ours / torch throughput (> 1: ours faster); goal > 1, aim >= 1.5x on the step and batch 16"
    )
    print(f"{'comparison':48s} {'ours':>12s} {'torch':>12s} {'ratio':>7s}  goal")
    if "step" in res:
        s, m = res["step"], res["step"]["model"]
        for kind in ("torch", "torch_compiled"):
            if f"ratio_vs_{kind}" in s:
                name = (
                    f"AST step {m['n_layer']}x{m['d_model']} b{m['batch']}x{m['seq_len']} vs {kind} (tok/s)"
                )
                ours, theirs = s["ours_tokens_per_s"], s[f"{kind}_tokens_per_s"]
                print(f"{name:48s} {ours:12.0f} {theirs:12.0f} {s[f'ratio_vs_{kind}']:7.2f}  >1, aim >=1.5")
    if "sparsegpt" in res:
        s = res["sparsegpt"]
        name = "SparseGPT 2:4, SmolLM2 block 0, 7 layers (s)"
        print(f"{name:48s} {s['ours_s']:12.3f} {s['torch_s']:12.3f} {s['ratio']:7.2f}  >1")
        print(f"    (our compile, excluded: {s['ours_compile_s']:.1f} s)")
    if "decode" in res:
        for r in res["decode"]["batches"]:
            name = f"decode SmolLM2-135M {res['decode']['model']} batch {r['batch']} (tok/s)"
            goal = ">1" if r["batch"] == 1 else ">1, aim >=1.5"
            ours, theirs = r["ours_tokens_per_s"], r["torch_tokens_per_s"]
            print(f"{name:48s} {ours:12.1f} {theirs:12.1f} {r['ratio']:7.2f}  {goal}")
            print(f"    (our compile, excluded: {r['ours_compile_s']:.1f} s)")
    if a.quick:
        print("(--quick: smoke sizes; the timings are not measurements)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
