"""Attention throughput per backend, and sliding-tile attention (STA) vs dense at the same shape.

    python benchmarks/attention.py --preset wan1.3b-480p     # 32,760 tokens, 12 heads, head dim 128, bf16
    python benchmarks/attention.py --preset wan14b-720p      # 75,600 tokens, 40 heads
    python benchmarks/attention.py --preset tiny             # CPU: interpret-mode kernels, seconds
    python benchmarks/attention.py --preset gpu --backends sage_attn,cudnn   # SageAttention vs cuDNN only

Top-k block-sparse rows (VSA's fine stage, ``topk_block_sparse_attention``, 64-token blocks, random top-k of
``ceil((1 - sparsity) * blocks)`` per query block, length padded to a block multiple): time, dense-equivalent and
kernel TFLOP/s (the selected blocks' FLOPs) and the speed-up over the best dense backend; on CPU the interpret-mode
kernels are also checked against the jnp reference (max abs difference printed).

Video sparse attention rows (``video_sparse_attention``, the whole op: 4x4x4 cube layout, coarse attention, top-k
selection, fine stage per implementation, gated sum) at sparsity 0.5-0.9 (``--backends video_sparse_attn``):
dense-equivalent and kernel TFLOP/s (fine blocks + coarse), speed-up over the best dense backend; on CPU each
interpret-mode fine kernel is checked against the jnp reference.

Dense TFLOP/s = 4 * B * N * Lq * Lk * E / time (forward; x2.5 with --backward). STA rows report the time, the
dense-equivalent TFLOP/s (the dense FLOPs at the unpadded length divided by the STA time, i.e. "how fast it
looks") and the kernel TFLOP/s (FLOPs of the blocks it actually visits, padding included), plus the speed-up over
the fastest dense backend. Sage rows (``SAGE_ATTN``, 8-bit, forward only) report the dense-equivalent TFLOP/s,
the speed-up over the fastest dense backend and the accuracy (cosine similarity, relative L1) against the
platform's default dense backend on the same inputs; on CPU, each Sage kernel in interpret mode against the jnp
reference. Timing: jitted, warm-up runs excluded, ``block_until_ready`` on every iteration,
median reported. Backends the platform cannot run are listed as skipped with the reason (never silently
replaced by the reference).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fastvideo_jax.attention import (  # noqa: E402
    AttentionBackend,
    FULL_WINDOW,
    MosaicConfig,
    SplashConfig,
    TokamaxConfig,
    TritonConfig,
    attention,
    mosaic_config_scope,
    sliding_tile_attention,
    splash_config_scope,
    tokamax_config_scope,
    triton_config_scope,
)
from fastvideo_jax.attention import api, sage, sliding_tile  # noqa: E402
from fastvideo_jax.attention.sage import SageConfig, sage_attention, sage_reference  # noqa: E402
from fastvideo_jax.attention.sliding_tile_mask import normalize_windows, sta_density  # noqa: E402


@dataclass(frozen=True)
class Preset:
    name: str
    batch: int
    grid: tuple[int, int, int]
    heads: int
    head_dim: int
    dtype: str
    tile: tuple[int, int, int]
    windows: tuple[tuple[int, int, int], ...]
    iters: int
    warmup: int
    cpu: bool = False

    @property
    def seq(self) -> int:
        return math.prod(self.grid)


PRESETS = {
    # Wan2.1-1.3B, 480x832x81 frames: latent 21x60x104, patch (1, 2, 2) -> 21x30x52 = 32,760 tokens.
    "wan1.3b-480p": Preset("wan1.3b-480p", 1, (21, 30, 52), 12, 128, "bfloat16", (6, 8, 8),
                           ((3, 3, 3), (3, 3, 5), (4, 4, 7), FULL_WINDOW), iters=20, warmup=3),
    # Wan2.1-14B, 720x1280x81 frames: 21x45x80 = 75,600 tokens, 40 heads.
    "wan14b-720p": Preset("wan14b-720p", 1, (21, 45, 80), 40, 128, "bfloat16", (6, 8, 8),
                          ((3, 3, 3), (3, 3, 5), (3, 6, 10), FULL_WINDOW), iters=10, warmup=2),
    # CPU smoke run: Pallas kernels in interpret mode, so the numbers say nothing about accelerators.
    "tiny": Preset("tiny", 1, (4, 8, 8), 2, 64, "float32", (2, 4, 4),
                   ((1, 1, 1), (1, 3, 3), FULL_WINDOW), iters=2, warmup=1, cpu=True),
}

DENSE = (AttentionBackend.REFERENCE, AttentionBackend.CUDNN, AttentionBackend.SPLASH_TPU,
         AttentionBackend.PALLAS_GPU_TRITON, AttentionBackend.PALLAS_GPU_MOSAIC)
STA = (AttentionBackend.REFERENCE, AttentionBackend.SPLASH_TPU, AttentionBackend.PALLAS_GPU_TRITON)
TOKAMAX_IMPLS = (None, "mosaic", "triton", "cudnn")  # None: tokamax picks
REFERENCE_MAX_BYTES = 8 << 30  # the dense reference materialises B x N x L x L fp32 logits


def _time(fn, args, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _scopes(preset: Preset):
    """Interpret-mode configs on CPU (so the Pallas paths run at all)."""
    import contextlib

    stack = contextlib.ExitStack()
    if preset.cpu:
        stack.enter_context(splash_config_scope(SplashConfig(block_q=128, block_kv=128, interpret=True)))
        stack.enter_context(triton_config_scope(TritonConfig(block_q=32, block_k=32, block_q_bwd=16,
                                                             block_k_bwd=16, interpret=True)))
    else:
        stack.enter_context(mosaic_config_scope(MosaicConfig()))
    return stack


def _dense_call(q, k, v, backend, impl):
    if backend is not AttentionBackend.TOKAMAX:
        return attention(q, k, v, backend=backend)
    with tokamax_config_scope(TokamaxConfig(implementation=impl)):
        return attention(q, k, v, backend=backend)


def _reason(check, *args) -> str | None:
    try:
        return check(*args)
    except Exception as e:  # a check must never abort the benchmark
        return f"check failed: {e}"


def run(preset: Preset, backward: bool, only: set[str] | None) -> list[dict]:
    dtype = jnp.dtype(preset.dtype)
    B, L, N, E = preset.batch, preset.seq, preset.heads, preset.head_dim
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(s, (B, L, N, E), jnp.float32).astype(dtype) for s in keys)
    mult = 2.5 if backward else 1.0
    dense_flops = 4.0 * B * N * L * L * E * mult
    rows = []

    def wrap(fn):
        if not backward:
            return jax.jit(fn)
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))

    with _scopes(preset):
        for backend, impl in [(b, None) for b in DENSE] + [(AttentionBackend.TOKAMAX, i) for i in TOKAMAX_IMPLS]:
            if only and backend.value not in only:
                continue
            label = backend.value if backend is not AttentionBackend.TOKAMAX else f"tokamax[{impl or 'auto'}]"
            row = {"case": "dense", "backend": label}
            entry = api._BACKENDS.get(backend)
            reason = _reason(entry.check, q, k, v, None) if entry else "not registered"
            if reason is None and backend is AttentionBackend.REFERENCE and B * N * L * L * 4 > REFERENCE_MAX_BYTES:
                reason = f"dense logits need {B * N * L * L * 4 / 2**30:.0f} GiB (the blocked reference is slower still)"
            if reason is not None:
                rows.append({**row, "skip": reason})
                continue
            fn = wrap(lambda q, k, v, b=backend, i=impl: _dense_call(q, k, v, b, i))
            try:
                t = _time(fn, (q, k, v), preset.iters, preset.warmup)
            except Exception as e:
                if backend is not AttentionBackend.TOKAMAX:
                    raise  # our own kernels fail loudly
                # an implementation tokamax cannot run here: report it, keep going
                rows.append({**row, "skip": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
                continue
            rows.append({**row, "ms": t * 1e3, "tflops": dense_flops / t / 1e12})

        for window in preset.windows:
            windows = normalize_windows(window, N)
            label = "full" if window == FULL_WINDOW else "x".join(map(str, window))
            for backend in STA:
                if only and backend.value not in only:
                    continue
                row = {"case": f"sta {label}", "backend": backend.value}
                chosen = sliding_tile.resolve_sta_backend(backend, q, k, v)
                if chosen is not backend:
                    rows.append({**row, "skip": "not available on this platform (see log)"})
                    continue
                geom = sliding_tile.sta_geometry(preset.grid, preset.tile, 0, backend)
                if backend is AttentionBackend.REFERENCE and not preset.cpu and window == FULL_WINDOW:
                    rows.append({**row, "skip": "full-window jnp reference is the dense reference"})
                    continue
                fn = wrap(lambda q, k, v, b=backend, w=windows: sliding_tile_attention(
                    q, k, v, grid=preset.grid, tile=preset.tile, window=w, backend=b))
                t = _time(fn, (q, k, v), preset.iters, preset.warmup)
                density = sta_density(geom, windows)
                kernel_flops = 4.0 * B * N * geom.padded_len ** 2 * E * density * mult
                rows.append({**row, "ms": t * 1e3, "tflops": dense_flops / t / 1e12,
                             "kernel_tflops": kernel_flops / t / 1e12, "density": density,
                             "padded": geom.padded_len})
    return rows


TOPK_SPARSITIES = (0.5, 0.9)
TOPK_BLOCK = 64


def run_topk(preset: Preset, backward: bool, only: set[str] | None) -> list[dict]:
    """Top-k block-sparse attention rows: each implementation at each sparsity (interpret check on CPU)."""
    from fastvideo_jax.attention import topk_block_sparse as tbs

    dtype = jnp.dtype(preset.dtype)
    B, N, E, bs = preset.batch, preset.heads, preset.head_dim, TOPK_BLOCK
    nb = -(-preset.seq // bs)
    L = nb * bs
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v = (jax.random.normal(s, (B, L, N, E), jnp.float32).astype(dtype) for s in keys[:3])
    mult = 2.5 if backward else 1.0
    dense_flops = 4.0 * B * N * preset.seq ** 2 * E * mult
    rows = []
    for sparsity in (0.5,) if preset.cpu else TOPK_SPARSITIES:
        topk = max(1, math.ceil((1 - sparsity) * nb))
        idx = jax.lax.top_k(jax.random.uniform(keys[3], (B, N, nb, nb)), topk)[1].astype(jnp.int32)
        ref = None
        for backend in tbs.TopkBackend:
            if only and backend.value not in only:
                continue
            row = {"case": f"topk s={sparsity}", "backend": f"topk_{backend.value}"}
            reason = tbs._check(backend, q, bs, preset.cpu, topk)
            if reason is None and backend is tbs.TopkBackend.REFERENCE and not preset.cpu:
                reason = "the jnp reference is a correctness twin, not timed on accelerators"
            if reason is not None:
                rows.append({**row, "skip": reason})
                continue

            def call(q, k, v, idx, b=backend):
                return tbs.topk_block_sparse_attention(q, k, v, idx, block_size=bs, backend=b,
                                                       interpret=preset.cpu or None)

            fn = (jax.jit(call) if not backward else
                  jax.jit(jax.grad(lambda q, k, v, i: jnp.sum(call(q, k, v, i).astype(jnp.float32)), (0, 1, 2))))
            t = _time(fn, (q, k, v, idx), preset.iters, preset.warmup)
            if preset.cpu:  # interpret check: every kernel against the jnp reference on the same indices
                out = jax.jit(call)(q, k, v, idx)
                if ref is None:
                    ref = jax.jit(lambda q, k, v, i: tbs.topk_block_sparse_reference(q, k, v, i, block_size=bs))(
                        q, k, v, idx)
                err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
                print(f"   topk check s={sparsity} {backend.value}: max |out - reference| = {err:.2e}")
            kernel_flops = 4.0 * B * N * L * topk * bs * E * mult
            rows.append({**row, "ms": t * 1e3, "tflops": dense_flops / t / 1e12,
                         "kernel_tflops": kernel_flops / t / 1e12, "density": topk / nb, "padded": L})
    return rows


VSA_SPARSITIES = (0.5, 0.7, 0.8, 0.9)


def run_vsa(preset: Preset, backward: bool, only: set[str] | None) -> list[dict]:
    """Video sparse attention rows (``video_sparse_attention``: cube layout, coarse stage, top-k selection, fine
    stage, gated sum) per fine-stage implementation and sparsity; on CPU each interpret-mode kernel is checked
    against the jnp reference on the same inputs (max abs difference printed)."""
    if only and AttentionBackend.VIDEO_SPARSE_ATTN.value not in only:
        return []
    from fastvideo_jax.attention import topk_block_sparse as tbs
    from fastvideo_jax.attention.video_sparse import video_sparse_attention
    from fastvideo_jax.attention.video_sparse_layout import CUBE_TOKENS, cube_layout, topk_count

    dtype = jnp.dtype(preset.dtype)
    B, L, N, E = preset.batch, preset.seq, preset.heads, preset.head_dim
    layout = cube_layout(preset.grid)
    C, Lp = layout.num_cubes, layout.padded_len
    q, k, v, g = (jax.random.normal(s, (B, L, N, E), jnp.float32).astype(dtype)
                  for s in jax.random.split(jax.random.key(2), 4))
    mult = 2.5 if backward else 1.0
    dense_flops = 4.0 * B * N * L * L * E * mult
    rows = []
    for sparsity in (0.5,) if preset.cpu else VSA_SPARSITIES:
        topk = topk_count(sparsity, C)
        ref = None
        for backend in tbs.TopkBackend:
            row = {"case": f"vsa s={sparsity}", "backend": f"vsa[{backend.value}]"}
            reason = tbs._check(backend, q, CUBE_TOKENS, preset.cpu, topk)
            if reason is None and backend is tbs.TopkBackend.REFERENCE and not preset.cpu:
                reason = "the jnp reference is a correctness twin, not timed on accelerators"
            if reason is not None:
                rows.append({**row, "skip": reason})
                continue

            def call(q, k, v, g, b=backend, s=sparsity):
                return video_sparse_attention(q, k, v, g, grid=preset.grid, sparsity=s, backend=b,
                                              interpret=preset.cpu or None)

            fn = (jax.jit(call) if not backward else jax.jit(
                jax.grad(lambda q, k, v, g: jnp.sum(call(q, k, v, g).astype(jnp.float32)), (0, 1, 2, 3))))
            t = _time(fn, (q, k, v, g), preset.iters, preset.warmup)
            if preset.cpu:
                out = jax.jit(call)(q, k, v, g)
                ref = out if backend is tbs.TopkBackend.REFERENCE else ref
                err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
                print(f"   vsa check s={sparsity} {backend.value}: max |out - reference| = {err:.2e}")
            kernel_flops = 4.0 * B * N * (Lp * topk * CUBE_TOKENS + C * C) * E * mult  # fine + coarse
            rows.append({**row, "ms": t * 1e3, "tflops": dense_flops / t / 1e12,
                         "kernel_tflops": kernel_flops / t / 1e12, "density": topk / C, "padded": Lp})
    return rows


def report(preset: Preset, rows: list[dict], backward: bool) -> None:
    dense = [r for r in rows if r["case"] == "dense" and "ms" in r]
    best = min(dense, key=lambda r: r["ms"]) if dense else None
    print(f"\n== {preset.name}: B={preset.batch} grid={preset.grid} L={preset.seq} heads={preset.heads} "
          f"head_dim={preset.head_dim} {preset.dtype} {'fwd+bwd' if backward else 'fwd'} on "
          f"{jax.devices()[0].device_kind} (jax {jax.__version__}); STA tile {preset.tile}")
    if preset.cpu:
        print("   (CPU: Pallas kernels run in interpret mode; timings only prove the paths run)")
    header = f"{'case':<14}{'backend':<20}{'ms':>10}{'TFLOP/s':>10}{'kern TF/s':>11}{'density':>9}{'vs best dense':>15}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "skip" in r:
            print(f"{r['case']:<14}{r['backend']:<20}  skipped: {r['skip']}")
            continue
        ratio = f"{best['ms'] / r['ms']:.2f}x" if best else "-"
        kern = f"{r['kernel_tflops']:.2f}" if "kernel_tflops" in r else ""
        dens = f"{r['density']:.3f}" if "density" in r else ""
        print(f"{r['case']:<14}{r['backend']:<20}{r['ms']:>10.3f}{r['tflops']:>10.3f}{kern:>11}{dens:>9}{ratio:>15}")
    if best:
        print(f"best dense: {best['backend']} {best['ms']:.3f} ms; 'vs best dense' = best dense time / row time")


# ----------------------------------------------------------------------------------------------------------
# SageAttention (SAGE_ATTN) against dense: rate and accuracy on the same inputs
# ----------------------------------------------------------------------------------------------------------

# label: (impl, PV dtype (None = the impl's default), the hardware its kernel needs)
SAGE_IMPLS = {"triton": ("triton", None, "gpu"), "triton fp8": ("triton", "float8_e4m3fn", "gpu"),
              "mosaic_tpu": ("mosaic_tpu", None, "tpu"), "jnp": ("jnp", None, None)}
SAGE_CPU_TILES = {"triton": (128, 64), "mosaic_tpu": (128, 128), "jnp": (None, None)}


def _sage_accuracy(out, exact) -> tuple[float, float]:
    """(cosine similarity, relative L1) of ``out`` against ``exact``: the SageAttention papers' metrics."""
    o, r = out.astype(jnp.float32).ravel(), exact.astype(jnp.float32).ravel()
    cos = jnp.dot(o, r) / (jnp.linalg.norm(o) * jnp.linalg.norm(r))
    return float(cos), float(jnp.abs(o - r).sum() / jnp.abs(r).sum())


def run_sage(preset: Preset, backward: bool, only: set[str] | None) -> list[dict]:
    """Sage rows: on a GPU/TPU the platform's kernel, timed like the dense rows, with its accuracy against the
    platform's default dense backend on the same inputs; on CPU (``tiny``) the interpret-mode check: every
    kernel against the jnp reference at the kernel's tiles (``vs_ref``: max error / max|ref|) and the accuracy."""
    if only and AttentionBackend.SAGE_ATTN.value not in only:
        return []
    if backward:
        return [{"case": "sage", "backend": "sage_attn", "skip": "forward only (an inference kernel)"}]
    dtype = jnp.dtype(preset.dtype)
    B, L, N, E = preset.batch, preset.seq, preset.heads, preset.head_dim
    q, k, v = (jax.random.normal(s, (B, L, N, E), jnp.float32).astype(dtype)
               for s in jax.random.split(jax.random.key(0), 3))
    exact = jax.jit(lambda q, k, v: attention(q, k, v))(q, k, v)  # the platform's default dense backend
    rows = []
    for label, (impl, pv_dtype, hardware) in SAGE_IMPLS.items():
        row = {"case": "sage", "backend": f"sage[{label}]"}
        on_hw = hardware is not None and jax.devices()[0].platform == hardware
        if not preset.cpu and not on_hw:
            rows.append({**row, "skip": f"needs a {hardware.upper()}" if hardware else "CPU check only"})
            continue
        bq, bk = SAGE_CPU_TILES[impl] if preset.cpu else (None, None)
        config = SageConfig(impl=impl, interpret=hardware is not None and not on_hw, block_q=bq, block_k=bk,
                            pv_dtype=pv_dtype)
        reason = _reason(sage.check_sage, q, k, v, None, config)
        if reason is not None:
            rows.append({**row, "skip": reason})
            continue
        fn = jax.jit(lambda q, k, v, c=config: sage_attention(q, k, v, config=c))
        t = _time(fn, (q, k, v), preset.iters, preset.warmup)
        out = fn(q, k, v)
        cos, l1 = _sage_accuracy(out, exact)
        row.update(ms=t * 1e3, tflops=4.0 * B * N * L * L * E / t / 1e12, cos=cos, rel_l1=l1)
        if preset.cpu:
            pv = config.resolved_pv_dtype(impl)
            ref = sage_reference(q, k, v, pv_dtype=pv, **({"block_q": bq, "block_k": bk} if bq else {}))
            row["vs_ref"] = float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max()
                                  / jnp.abs(ref.astype(jnp.float32)).max())
        rows.append(row)
    return rows


def report_sage(preset: Preset, rows: list[dict]) -> None:
    sage_rows = [r for r in rows if r["case"] == "sage" and "ms" in r]
    if not sage_rows:
        return
    from _results import record

    print("Sage accuracy vs the default dense backend (same inputs): cosine similarity, relative L1"
          + ("; vs_ref = kernel vs the jnp reference at its tiles (max error / max|ref|)" if preset.cpu else ""))
    for r in sage_rows:
        ref = f"  vs_ref {r['vs_ref']:.2e}" if "vs_ref" in r else ""
        print(f"  {r['backend']:<20} cos {r['cos']:.6f}  rel L1 {r['rel_l1']:.4f}{ref}")
        record(f"attention {preset.name} sage accuracy (L={preset.seq}, heads={preset.heads}, "
               f"head_dim={preset.head_dim}, {preset.dtype})", r["backend"], cos=r["cos"], rel_l1=r["rel_l1"],
               vs_ref=r.get("vs_ref"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=[*PRESETS, "gpu", "all"])
    p.add_argument("--backward", action="store_true", help="time forward + backward (jax.grad)")
    p.add_argument("--backends", default="", help="comma-separated backend values to run (default: all)")
    p.add_argument("--iters", type=int, default=None)
    args = p.parse_args(argv)
    names = {"all": list(PRESETS), "gpu": ["wan1.3b-480p", "wan14b-720p"]}.get(args.preset, [args.preset])
    only = {b.strip() for b in args.backends.split(",") if b.strip()} or None
    for name in names:
        preset = PRESETS[name]
        if args.iters:
            preset = Preset(**{**preset.__dict__, "iters": args.iters})
        rows = run(preset, args.backward, only)
        rows += run_topk(preset, args.backward, only)
        rows += run_vsa(preset, args.backward, only)
        rows += run_sage(preset, args.backward, only)
        report(preset, rows, args.backward)
        report_sage(preset, rows)
        _record(preset, rows, args.backward)


def _record(preset: Preset, rows: list[dict], backward: bool) -> None:
    from _results import record

    for r in rows:
        if "ms" in r:
            record(f"attention {preset.name} {'fwd+bwd' if backward else 'fwd'} (L={preset.seq}, "
                   f"heads={preset.heads}, head_dim={preset.head_dim}, {preset.dtype})", r["case"],
                   backend=r["backend"], ours_ms=r["ms"], tflops=r["tflops"],
                   **({"kernel_tflops": r["kernel_tflops"], "density": r["density"]} if "density" in r else {}))


if __name__ == "__main__":
    main()
