"""Test-session setup shared by every test module."""

import os

# Eight virtual CPU devices so sharding tests can build real meshes on a CPU-only machine. This must
# happen before JAX initialises its backend; single-device code keeps running on device 0.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax

jax.config.update("jax_num_cpu_devices", 8)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def jax_subprocess_cache(tmp_path_factory):
    """A persistent-compilation-cache directory shared by every child JAX process of the session."""
    return tmp_path_factory.mktemp("jax_compile_cache")


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory):
    """A small real-text training file (the first 24 KB of the built-in docstring corpus)."""
    from ast_jax.data import builtin_corpus

    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(builtin_corpus(max_bytes=24_000), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory, tiny_text_file):
    """The uninterrupted single-device run of ``_subproc.TINY_ARGS`` (in this process, on device 0).

    Returns ``{"args", "dir", "result", "state"}``: the CLI arguments (text file included, no mesh or
    checkpoint dir), its checkpoint directory, the ``RunResult`` and the final checkpoint tree on the host.
    """
    from _subproc import TINY_ARGS

    from ast_jax.checkpoint import CheckpointStore
    from ast_jax.train import parse_args, run

    args = [*TINY_ARGS, "--text", str(tiny_text_file)]
    ckdir = tmp_path_factory.mktemp("tiny_reference")
    result = run(
        parse_args([*args, "--mesh", "data=1", "--checkpoint-dir", str(ckdir)]), devices=jax.devices()[:1]
    )
    store = CheckpointStore(ckdir)
    state, _ = store.restore(store.latest_step())
    return {"args": args, "dir": ckdir, "result": result, "state": jax.device_get(state)}


@pytest.fixture(scope="session")
def lidu_tiny_file(tmp_path_factory):
    """The tiny time-ordered interaction file of ``_lidu_tiny.write_tiny_file`` (named ``tiny.txt``, so a
    study run on it writes ``*_tiny.*`` files)."""
    from _lidu_tiny import write_tiny_file

    return write_tiny_file(tmp_path_factory.mktemp("data") / "tiny.txt")
