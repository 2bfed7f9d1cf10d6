"""Test session set-up: 8 fake CPU devices (for sharding tests), offline hub, fp32 matmuls."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("FASTVIDEO_JAX_COMPILATION_CACHE", "0")  # hermetic: no executables shared between runs

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
