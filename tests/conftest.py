"""Test-session setup shared by every test module."""

import os

# Eight virtual CPU devices so sharding tests can build real meshes on a CPU-only machine. This must
# happen before JAX initialises its backend; single-device code keeps running on device 0.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax

jax.config.update("jax_num_cpu_devices", 8)
