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
