"""Write ``lidu_quickstart.ipynb`` and ``ast_quickstart.ipynb`` (run: ``python notebooks/make_notebooks.py``).

The notebooks are generated so that they stay reviewable as code. Each has

1. an install cell that pip-installs the package only when it is not importable (Colab, fresh runtimes);
2. device detection (TPU / GPU / CPU) -- the code is the same on all three;
3. a cell tagged ``parameters`` (papermill convention) that the test suite overrides with tiny settings;
4. a small end-to-end run with plots.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

INSTALL = """\
# Install the package when it is not importable yet (Colab, a fresh runtime). SOURCE is where this
# repository is: a local checkout (e.g. after `!git clone <repo-url>` in Colab), a git URL or a wheel.
# By default the first checkout found here or one folder up is used.
import importlib.util
import os
import subprocess
import sys

SOURCE = os.environ.get("LIDU_AST_JAX_SOURCE", "")
if importlib.util.find_spec("{package}") is None:
    if not SOURCE:
        found = [d for d in (".", "..", "lidu-ast-jax") if os.path.exists(os.path.join(d, "pyproject.toml"))]
        if not found:
            raise RuntimeError("set SOURCE (or LIDU_AST_JAX_SOURCE) to this repository's checkout or git URL")
        SOURCE = found[0]
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", SOURCE])
else:
    print("{package} already importable; nothing to install")"""

DEVICES = """\
import jax

KIND = {"tpu": "TPU", "gpu": "GPU", "cuda": "GPU", "rocm": "GPU"}.get(jax.default_backend(), "CPU")
print(f"{KIND}: {jax.device_count()} device(s) in {jax.process_count()} process(es): {jax.devices()}")"""


def lidu_notebook() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# LiDu quickstart\n\n"
            "LiDu scores how uncertain a recommender is about a user's whole top-K list: "
            "`LiDu_u = -log P(S_l1 > ... > S_lK > max of the other candidates)` under the item score "
            "distributions. Here a vmapped deep ensemble of BPR-MF models on a synthetic data set with known "
            "ground truth gives those distributions; LiDu is computed with the users sharded over every "
            "available device, and compared with the per-user NDCG@K it should predict."
        ),
        new_code_cell(INSTALL.format(package="lidu_jax")),
        new_code_cell(DEVICES),
        new_code_cell(
            "# Settings (the test suite replaces this cell with tiny values)\n"
            "N_USERS = 600\n"
            "N_ITEMS = 400\n"
            "N_SEEDS = 8  # ensemble members, trained together with jax.vmap\n"
            "EPOCHS = 30\n"
            "K = 10\n"
            "GRID_SIZE = 256  # cells of the exact LiDu grid recursion",
            metadata={"tags": ["parameters"]},
        ),
        new_markdown_cell("## Data and a deep ensemble (one `vmap` over seeds)"),
        new_code_cell(
            "import jax.numpy as jnp\n"
            "import numpy as np\n"
            "\n"
            "from lidu_jax import metrics\n"
            "from lidu_jax.models.mf import MFConfig, make_bpr_mf\n"
            "from lidu_jax.synthetic import SyntheticConfig, generate\n"
            "from lidu_jax.training import fit, score_users\n"
            "\n"
            "cfg = SyntheticConfig(n_users=N_USERS, n_items=N_ITEMS, max_activity=min(150, N_ITEMS // 2))\n"
            "data = generate(cfg)\n"
            "split = data.split\n"
            "model = make_bpr_mf(split, MFConfig(dim=16))\n"
            "keys = jax.random.split(jax.random.key(0), N_SEEDS)\n"
            "params, _ = fit(model, keys, jnp.ones((N_SEEDS, len(split.train_users))), EPOCHS)\n"
            "# (seeds, users, items) full-catalogue scores -> per-item Gaussian score distributions\n"
            "scores = np.asarray(score_users(model, params, np.arange(split.n_users)))\n"
            "mean, std = scores.mean(0), scores.std(0) + 1e-3\n"
            "train = split.train_matrix()\n"
            "print(f'{split.n_users} users, {split.n_items} items, {len(split.train_users)} training pairs')"
        ),
        new_markdown_cell("## LiDu with users sharded over all devices"),
        new_code_cell(
            "from lidu_jax.sharding import lidu_sharded\n"
            "\n"
            "# Same numbers as lidu_jax.lidu on one device (tests/test_sharding.py checks it).\n"
            "lidu_values, rankings = lidu_sharded(mean, std, K, candidates=~train, grid_size=GRID_SIZE)\n"
            "ndcg = np.asarray(metrics.ndcg_at_k(mean, data.true_relevant, K, candidates=~train))\n"
            "tau = metrics.kendall_tau(-lidu_values, ndcg)\n"
            "print(f'Kendall tau(-LiDu, NDCG@{K}) = {tau:.3f} over {len(ndcg)} users')"
        ),
        new_code_cell(
            "import matplotlib.pyplot as plt\n"
            "\n"
            "fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))\n"
            "axes[0].scatter(lidu_values, ndcg, s=6, alpha=0.5)\n"
            "axes[0].set(xlabel='LiDu (higher = more uncertain)', ylabel=f'NDCG@{K}', title='per user')\n"
            "n_bins = max(2, min(10, len(ndcg) // 10))\n"
            "bins = np.array_split(np.argsort(lidu_values), n_bins)\n"
            "axes[1].plot(range(1, n_bins + 1), [ndcg[b].mean() for b in bins], marker='o')\n"
            "axes[1].set(xlabel='LiDu bin (1 = most certain)', ylabel=f'mean NDCG@{K}', title='binned')\n"
            "fig.tight_layout()\n"
            "plt.show()"
        ),
    ]
    return new_notebook(cells=cells, metadata=_metadata())


def ast_notebook() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# AST quickstart: 2:4 sparse retraining, sharded, checkpointed, exported\n\n"
            "A small byte-level GPT is trained densely (the teacher), then retrained into a 2:4 sparse "
            "student with Annealing SR-STE and KL distillation (`ast_jax.train`): params, optimizer state "
            "and masks are FSDP-sharded over a `(data, fsdp)` mesh of every device, orbax checkpoints are "
            "written as it goes (rerun the cell: it resumes), and the result is exported in compressed "
            "2:4 form with int4 values."
        ),
        new_code_cell(INSTALL.format(package="ast_jax")),
        new_code_cell(DEVICES),
        new_code_cell(
            "# Settings (the test suite replaces this cell with tiny values)\n"
            "TEACHER_STEPS = 300\n"
            "STEPS = 150\n"
            "BATCH = 32  # global; must divide by the device count\n"
            "SEQ_LEN = 64\n"
            "D_MODEL = 128\n"
            "N_LAYER = 2\n"
            "MAX_BYTES = None  # corpus size (None = the whole built-in corpus)\n"
            "EVAL_WINDOWS = 64\n"
            'MESH = "data=-1,fsdp=1"  # e.g. "data=4,fsdp=2" on 8 devices',
            metadata={"tags": ["parameters"]},
        ),
        new_markdown_cell("## Train (teacher, then the 2:4 student)"),
        new_code_cell(
            "import pathlib\n"
            "import tempfile\n"
            "\n"
            "from ast_jax.train import TrainConfig, build_model, run\n"
            "\n"
            "workdir = pathlib.Path(tempfile.mkdtemp(prefix='ast_quickstart_'))\n"
            "cfg = TrainConfig.from_flags(  # one keyword per flag of python -m ast_jax.train\n"
            "    mesh=MESH, teacher_steps=TEACHER_STEPS, steps=STEPS, batch_size=BATCH, seq_len=SEQ_LEN,\n"
            "    d_model=D_MODEL, n_layer=N_LAYER, max_bytes=MAX_BYTES, eval_windows=EVAL_WINDOWS,\n"
            "    checkpoint_dir=str(workdir / 'ckpt'), save_every=max(1, STEPS // 3),\n"
            "    log_every=max(1, STEPS // 5),\n"
            "    export_dir=str(workdir / 'export'), export_bits=4,\n"
            ")\n"
            "result = run(cfg)\n"
            "summary = result.summary\n"
            "print('perplexity', summary.get('perplexity'), '| strict 2:4:', summary['strict_nm'])"
        ),
        new_code_cell(
            "import matplotlib.pyplot as plt\n"
            "import numpy as np\n"
            "\n"
            "from ast_jax.optim import get_masks\n"
            "\n"
            "steps, losses = zip(*result.losses)\n"
            "masks = get_masks(result.state.opt_state)['model']\n"
            "mask = np.asarray(masks['block_0']['mlp']['fc']['kernel'])\n"
            "fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))\n"
            "axes[0].plot(steps, losses)\n"
            "axes[0].set(xlabel='step', ylabel='0.67 KL + 0.33 CE', title='2:4 retraining loss')\n"
            "axes[1].imshow(mask[:32, :32], cmap='gray_r', interpolation='nearest')\n"
            "axes[1].set(title='block_0/mlp/fc mask, 32x32 corner', xlabel='out', ylabel='in (2 of 4)')\n"
            "fig.tight_layout()\n"
            "plt.show()"
        ),
        new_markdown_cell("## The compressed export: size and quality"),
        new_code_cell(
            "from ast_jax.data import eval_batches, load_text_data\n"
            "from ast_jax.export import decompress_params, format_size_table, load_compressed, size_report\n"
            "from ast_jax.sparsify import is_strict_nm\n"
            "from ast_jax.step import evaluate_perplexity\n"
            "\n"
            "exported = load_compressed(workdir / 'export')\n"
            "print(format_size_table({'2:4 + int4 (group 128)': size_report(exported)}))\n"
            "params_q = decompress_params(exported)  # the student ({model, slorb} after SLoRB)\n"
            "assert is_strict_nm(params_q)\n"
            "data = load_text_data(max_bytes=MAX_BYTES)\n"
            "windows = min(EVAL_WINDOWS, (len(data.heldout) - 1) // SEQ_LEN)\n"
            "batches = list(eval_batches(data.heldout, SEQ_LEN, BATCH, windows))\n"
            "ppl_int4 = evaluate_perplexity(build_model(cfg), params_q, batches)\n"
            "print(f\"held-out perplexity: teacher {summary['perplexity']['teacher']:.3f}, \"\n"
            "      f\"2:4 student {summary['perplexity']['student']:.3f}, 2:4 + int4 export {ppl_int4:.3f}\")"
        ),
        new_markdown_cell(
            "Run the training cell again with a larger `STEPS`: it finds the checkpoints in `workdir` and "
            "resumes exactly (same params, optimizer state, masks, RNG and data position). The same run from "
            "a shell, sharded and multi-host: `python -m ast_jax.train --mesh data=4,fsdp=2 --checkpoint-dir "
            "ckpt` (add `--coordinator-address host:port --num-processes N --process-id i` per host)."
        ),
    ]
    return new_notebook(cells=cells, metadata=_metadata())


def _metadata() -> dict:
    return {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "accelerator": "TPU",
        "colab": {"provenance": []},
    }


def main() -> None:
    for name, nb in (("lidu_quickstart.ipynb", lidu_notebook()), ("ast_quickstart.ipynb", ast_notebook())):
        for i, cell in enumerate(nb.cells):
            cell.id = f"{name.split('_')[0]}-{i:02d}"  # stable ids: regenerating gives an identical file
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
