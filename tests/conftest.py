"""Test session set-up: 8 fake CPU devices (for sharding tests), offline hub.

No global matmul precision: each component applies its own ``matmul_precision`` (fp32 components run at
"highest" by default), so parity figures hold for the precision a user actually gets.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("FASTVIDEO_JAX_COMPILATION_CACHE", "0")  # hermetic: no executables shared between runs

import contextlib  # noqa: E402
import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def _count_compiles():
    """Counts XLA backend compilations in the block: ``with counter() as n: ...; n[0]``."""
    count = [0]

    def listener(event, duration, **kwargs):
        if event == _BACKEND_COMPILE:
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture
def count_compiles():
    return _count_compiles


def _precisions(jaxpr) -> list:
    """The ``precision`` of every dot_general / conv in a (closed) jaxpr, nested jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            out.append(eqn.params.get("precision"))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    out.extend(_precisions(sub))
    return out


@pytest.fixture
def matmul_precisions():
    """``f(fn, *args)``: the precision name ("HIGHEST", "DEFAULT", ...; None = not set) of every matmul/conv
    that ``fn(*args)`` traces."""

    def name(precision):
        return None if precision is None else "/".join(sorted({str(p).split(".")[-1] for p in precision}))

    def run(fn, *args):
        return [name(p) for p in _precisions(jax.make_jaxpr(fn)(*args).jaxpr)]

    return run


@pytest.fixture(autouse=True)
def _fresh_warn_once():
    """``attention._common.warn_once`` is a process-wide cache: clear it around every test, so a warning a test
    expects was not swallowed by an earlier test (the suite passes in any order)."""
    from fastvideo_jax.attention import _common

    _common.warn_once.cache_clear()
    yield
    _common.warn_once.cache_clear()


@pytest.fixture(autouse=True, scope="module")
def _release_executables():
    """Free compiled executables after every test module. Each XLA CPU executable holds memory mappings, and
    one process running the whole suite compiles enough to pass the kernel's per-process limit
    (``vm.max_map_count``, 65530), where the next compile dies with a segmentation fault."""
    yield
    jax.clear_caches()
    gc.collect()
