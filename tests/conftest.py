"""Shared pytest setup.

Compile time dominates on CPU, so compiled functions and tiny models are built once per
session in fixtures that the test modules share. Tests run on the host CPU; a test that
needs several devices starts a subprocess with ``--xla_force_host_platform_device_count``.
"""

from __future__ import annotations

import os

# Deterministic float32 matmuls on CPU for parity tests against PyTorch.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
