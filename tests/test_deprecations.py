"""A deprecated JAX API used by the library fails the suite the day it is deprecated.

``pyproject.toml`` turns DeprecationWarnings attributed to our own modules into errors for every test; this
test also imports every module of the library (and runs the kernel wrappers that import JAX's Pallas ops
lazily) in a fresh interpreter, so a deprecated import is caught even when no other test reaches it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, warnings
    warnings.filterwarnings("error", category=DeprecationWarning, module=r"(fastvideo_jax|converters)(\\.|$)")
    import jax, jax.numpy as jnp
    import converters, fastvideo_jax
    for pkg in (fastvideo_jax, converters):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(info.name)
    from fastvideo_jax.attention import pallas_gpu, splash_tpu
    from fastvideo_jax.attention._gpu_common import TritonConfig
    q = jnp.ones((1, 32, 1, 16), jnp.float32)
    pallas_gpu.triton_attention(q, q, q, config=TritonConfig(block_q=16, block_k=16, interpret=True))
    pallas_gpu._mgpu_module()
    with splash_tpu.config_scope(splash_tpu.SplashConfig(block_q=128, block_kv=128, interpret=True)):
        splash_tpu.splash_attention(jnp.ones((1, 128, 1, 128), jnp.float32), *(jnp.ones((1, 128, 1, 128)),) * 2)
    print("ok")
    """
)


def test_library_uses_no_deprecated_jax_api():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_the_filter_catches_a_deprecation_raised_from_our_modules():
    """Control: the same filter turns a DeprecationWarning attributed to one of our modules into an error."""
    script = textwrap.dedent(
        """
        import warnings, types, sys
        warnings.filterwarnings("error", category=DeprecationWarning, module=r"(fastvideo_jax|converters)(\\.|$)")
        mod = types.ModuleType("fastvideo_jax.fake")
        exec("import warnings\\ndef f():\\n    warnings.warn('old', DeprecationWarning)", mod.__dict__)
        try:
            mod.f()
        except DeprecationWarning:
            print("raised")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "raised", out.stderr[-2000:]


# Deprecated from the jax release named; matched in our sources whatever jax is installed here (the subprocess
# test above only bites on a jax that already warns).
DEPRECATED_JAX_MODULES = {
    "jax.experimental.pallas.ops.gpu.attention": "0.12",  # use tokamax.dot_product_attention / our kernel
    "jax.experimental.pallas.ops.gpu.decode_attention": "0.12",
    "jax.experimental.pallas.ops.gpu.layer_norm": "0.12",
    "jax.experimental.pallas.ops.gpu.rms_norm": "0.12",
    "jax.experimental.pallas.ops.gpu.paged_attention": "0.12",
}


def test_library_source_imports_no_module_deprecated_in_newer_jax():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = []
    for path in sorted([*root.joinpath("fastvideo_jax").rglob("*.py"), *root.joinpath("converters").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            else:
                continue
            found += [f"{path.relative_to(root)}:{node.lineno} {n}" for n in names if n in DEPRECATED_JAX_MODULES]
    assert not found, found
