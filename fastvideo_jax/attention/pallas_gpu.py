"""GPU Pallas attention: JAX's Triton flash kernel, a block-sparse Triton kernel, and the Mosaic-GPU FA3 kernel.

* ``triton_attention``: ``jax.experimental.pallas.ops.gpu.attention.mha``. The kernel needs lengths that are a
  multiple of its blocks, so q/k/v are zero-padded and the padded keys are masked with segment ids (valid
  tokens 1, padding 0; padded query rows attend to padding only and are sliced off). ``mha``'s segment ids are
  shared by queries and keys, which cannot express a key-only mask when ``kv_mask`` is given or when q and kv
  lengths differ; those calls run on our own kernel below (same Triton lowering) with a dense block table.
* ``block_sparse_attention``: our Triton-lowered Pallas flash kernel that, for each q block, visits only the kv
  blocks listed in a precomputed table (count + ids), with per-key validity masking and a block-sparse backward
  (dQ over the same lists, dK/dV over the transposed lists). Used by sliding-tile attention on GPU.
* ``mosaic_attention``: ``attention_mgpu`` (FlashAttention-3 on Hopper, sm90 only). Its shared-memory buffers
  are fp16 whatever the input dtype, so bf16 inputs fail with a dtype mismatch (jax 0.11.2). Work-around: bf16
  inputs are cast to fp16 (clipped to +-65504; every bf16 value in [6.1e-5, 65504] is exactly representable in
  fp16, so the cast loses nothing in practice) when ``MosaicConfig.allow_fp16_compute`` (default True), and the
  output is cast back. The kernel has no masking; padded/masked keys are zeroed (logit exactly 0, value 0) and
  their known contribution ``n_masked * 2^-lse`` is removed from the softmax denominator using the kernel's
  log-sum-exp; the backward pass is the kernel's own, fed the corrected output and lse (exact, since zeroed keys
  add nothing to dQ). The correction is ill-conditioned only when the valid keys' softmax mass is tiny next to
  the number of masked keys (logits all << 0); tests cover it with an emulated kernel on CPU.

All entry points take (B, L, N, E) and ``scale`` (default 1/sqrt(E)). ``interpret=True`` runs the Triton
kernels in Pallas interpret mode (CPU tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fastvideo_jax.attention.sliding_tile_mask import BlockTables, dense_block_tables, round_up

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2E = math.log2(math.e)
FP16_MAX = 65504.0


def _platform() -> str:
    return jax.devices()[0].platform


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _pad_axis(x: jax.Array, axis: int, new: int) -> jax.Array:
    extra = new - x.shape[axis]
    if extra == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad)


# ==========================================================================================================
# Configs
# ==========================================================================================================


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Block sizes and launch options for the Triton-lowered kernels (``mha`` and the block-sparse kernel).

    Blocks must be powers of two >= 16 (Triton tensor shapes, ``tl.dot`` minimum); backward blocks default to
    min(64, forward block) and must divide the forward blocks.
    """

    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int | None = None
    block_k_bwd: int | None = None
    num_warps: int | None = None
    num_stages: int = 2
    interpret: bool = False

    def __post_init__(self):
        if self.block_q_bwd is None:
            object.__setattr__(self, "block_q_bwd", min(64, self.block_q))
        if self.block_k_bwd is None:
            object.__setattr__(self, "block_k_bwd", min(64, self.block_k))
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            b = getattr(self, name)
            if not _is_pow2(b) or b < 16:
                raise ValueError(f"TritonConfig.{name}={b} must be a power of two >= 16")
        if self.block_q % self.block_q_bwd or self.block_k % self.block_k_bwd:
            raise ValueError("backward blocks must divide the forward blocks (one padding serves both passes)")

    @property
    def multiple(self) -> int:
        return max(self.block_q, self.block_k)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """``attention_mgpu.TuningConfig`` fields plus dtype policy.

    Defaults: the configuration measured at 675 TFLOP/s on H200 (fp16, N=32768): block_q 64, block_kv 128,
    2 stages. ``emulate`` swaps the kernel for a jnp model with the same contract (CPU tests only).
    """

    block_q: int = 64
    block_kv: int = 128
    max_concurrent_steps: int = 2
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    block_q_dq: int = 64
    block_kv_dq: int = 64
    allow_fp16_compute: bool = True
    emulate: bool = False

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq"):
            if getattr(self, name) % 64:
                raise ValueError(f"MosaicConfig.{name}={getattr(self, name)} must be a multiple of 64")
        if self.max_concurrent_steps < 2:
            raise ValueError("MosaicConfig.max_concurrent_steps must be >= 2")

    @property
    def q_multiple(self) -> int:
        return math.lcm(2 * self.block_q, self.block_q_dq, self.block_q_dkv)

    @property
    def kv_multiple(self) -> int:
        return math.lcm(self.block_kv, self.block_kv_dkv, self.block_kv_dq)


_TRITON_CONFIG = [TritonConfig()]
_MOSAIC_CONFIG = [MosaicConfig()]


def current_triton_config() -> TritonConfig:
    return _TRITON_CONFIG[-1]


def current_mosaic_config() -> MosaicConfig:
    return _MOSAIC_CONFIG[-1]


@contextlib.contextmanager
def triton_config_scope(config: TritonConfig):
    """Config used by the registered PALLAS_GPU_TRITON backend (e.g. ``interpret=True`` in CPU tests)."""
    _TRITON_CONFIG.append(config)
    try:
        yield config
    finally:
        _TRITON_CONFIG.pop()


@contextlib.contextmanager
def mosaic_config_scope(config: MosaicConfig):
    _MOSAIC_CONFIG.append(config)
    try:
        yield config
    finally:
        _MOSAIC_CONFIG.pop()


# ==========================================================================================================
# Capability checks (None = can run, else the reason)
# ==========================================================================================================


def check_triton(q, k, v, kv_mask=None, config: TritonConfig | None = None) -> str | None:
    config = config or current_triton_config()
    if not config.interpret and _platform() != "gpu":
        return f"needs a GPU or interpret=True (platform is {_platform()})"
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype} unsupported"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    return None


def _compute_capability() -> str | None:
    dev = jax.devices()[0]
    return getattr(dev, "compute_capability", None)


def _mgpu_module():
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu
    except Exception:  # pragma: no cover - depends on the jaxlib build
        return None
    return attention_mgpu


def check_mosaic(q, k, v, kv_mask=None, config: MosaicConfig | None = None) -> str | None:
    config = config or current_mosaic_config()
    if not config.emulate:
        if _platform() != "gpu":
            return f"needs an sm90 GPU (platform is {_platform()})"
        cc = _compute_capability()
        if cc is not None and str(cc) != "9.0":
            return f"needs compute capability 9.0 (Hopper wgmma), device has {cc}"
        mod = _mgpu_module()
        if mod is None or not all(hasattr(mod, n) for n in ("attention", "_attention_bwd", "TuningConfig")):
            return "jax.experimental.pallas.ops.gpu.attention_mgpu (attention, _attention_bwd) not importable"
    if q.dtype == jnp.bfloat16 and not config.allow_fp16_compute:
        return "the Mosaic kernel's smem buffers are fp16; bf16 needs allow_fp16_compute=True"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"needs fp16/bf16 inputs (got {q.dtype})"
    if q.shape[-1] % 64 or q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} must be a multiple of 64 and at most 256"
    return None


# ==========================================================================================================
# Triton: JAX's mha with padding + segment ids
# ==========================================================================================================


def triton_attention(q, k, v, kv_mask=None, scale=None, *, config: TritonConfig | None = None):
    """Dense attention on the Triton-lowered Pallas flash kernel, any lengths, optional key mask."""
    config = config or current_triton_config()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    B, Lq, N, E = q.shape
    Lk = k.shape[1]
    if kv_mask is not None or Lq != Lk:
        # Key-only masking (or cross lengths): our kernel with a dense block table.
        return dense_block_sparse_attention(q, k, v, kv_mask, scale=scale, config=config)

    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    Lp = round_up(Lq, config.multiple)
    qp, kp, vp = (_pad_axis(t, 1, Lp) for t in (q, k, v))
    segment_ids = None
    if Lp != Lq:
        segment_ids = jnp.broadcast_to((jnp.arange(Lp) < Lq).astype(jnp.int32), (B, Lp))
    block_sizes = gpu_attention.BlockSizes(
        block_q=config.block_q, block_k=config.block_k,
        block_q_dkv=config.block_q_bwd, block_kv_dkv=config.block_k_bwd,
        block_q_dq=config.block_q_bwd, block_kv_dq=config.block_k_bwd,
    )
    out = gpu_attention.mha(
        qp, kp, vp, segment_ids, sm_scale=scale, causal=False, block_sizes=block_sizes,
        num_warps=config.num_warps, num_stages=config.num_stages, interpret=config.interpret,
    )
    return out[:, :Lq]


# ==========================================================================================================
# Block-sparse Triton kernel
# ==========================================================================================================


@dataclasses.dataclass(frozen=True)
class _KernelStatic:
    scale: float
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    has_valid: bool
    num_warps: int | None
    num_stages: int
    interpret: bool


def _compiler_params(static: _KernelStatic, block_a: int, block_b: int, head_dim: int):
    from jax.experimental.pallas import triton as plgpu

    warps = static.num_warps
    if warps is None:
        warps = 4 if head_dim <= 64 or block_a * block_b < 128 * 128 else 8
    return plgpu.CompilerParams(num_warps=warps, num_stages=static.num_stages)


def _fwd_kernel(table_ref, q_ref, k_ref, v_ref, valid_ref, o_ref, lse_ref, *, st: _KernelStatic):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    bq, bk = st.block_q, st.block_k
    E = q_ref.shape[-1]
    qk_scale = st.scale * LOG2E
    q = plgpu.load(q_ref)
    count = table_ref[0]

    def body(j, carry):
        acc, m_prev, l_prev = carry
        kb = table_ref[j + 1]
        sl = pl.ds(kb * bk, bk)
        k = plgpu.load(k_ref.at[sl, :])
        s = plgpu.dot(q, k.T) * qk_scale  # (bq, bk), log2 domain
        if st.has_valid:
            ok = valid_ref[sl] != 0
            s = jnp.where(ok[None, :], s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1))
        corr = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - m_next[:, None])
        l_next = corr * l_prev + jnp.sum(p, axis=-1)
        v = plgpu.load(v_ref.at[sl, :])
        acc = corr[:, None] * acc + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_next, l_next

    acc = jnp.zeros((bq, E), jnp.float32)
    m = jnp.zeros((bq,), jnp.float32) + MASK_VALUE
    l = jnp.zeros((bq,), jnp.float32)
    acc, m, l = lax.fori_loop(0, count, body, (acc, m, l))
    l_safe = jnp.where(l == 0.0, 1.0, l)
    plgpu.store(o_ref, (acc / l_safe[:, None]).astype(o_ref.dtype))
    lse_ref[...] = m + jnp.log2(l_safe)


def _dq_kernel(table_ref, q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, delta_ref, dq_ref, *, st: _KernelStatic):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    bq, bk = st.block_q_bwd, st.block_k_bwd
    E = q_ref.shape[-1]
    qk_scale = st.scale * LOG2E
    q = plgpu.load(q_ref)
    do = plgpu.load(do_ref)
    lse = lse_ref[...]
    delta = delta_ref[...]
    count = table_ref[0]
    sub = st.block_k // bk  # table ids are in forward kv blocks; the backward walks sub-blocks of them

    def body(j, dq):
        kb = table_ref[j // sub + 1] * sub + j % sub
        sl = pl.ds(kb * bk, bk)
        k = plgpu.load(k_ref.at[sl, :])
        v = plgpu.load(v_ref.at[sl, :])
        s = plgpu.dot(q, k.T) * qk_scale
        p = jnp.exp2(s - lse[:, None])
        if st.has_valid:
            p = jnp.where((valid_ref[sl] != 0)[None, :], p, 0.0)
        dp = plgpu.dot(do, v.T)
        ds = p * (dp - delta[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, count * sub, body, jnp.zeros((bq, E), jnp.float32))
    plgpu.store(dq_ref, (dq * st.scale).astype(dq_ref.dtype))


def _dkv_kernel(table_ref, q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                st: _KernelStatic):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    bq, bk = st.block_q_bwd, st.block_k_bwd
    E = k_ref.shape[-1]
    qk_scale = st.scale * LOG2E
    k = plgpu.load(k_ref)
    v = plgpu.load(v_ref)
    ok = (valid_ref[...] != 0) if st.has_valid else None
    count = table_ref[0]
    sub = st.block_q // bq

    def body(j, carry):
        dk, dv = carry
        qb = table_ref[j // sub + 1] * sub + j % sub
        sl = pl.ds(qb * bq, bq)
        q = plgpu.load(q_ref.at[sl, :])
        do = plgpu.load(do_ref.at[sl, :])
        lse = lse_ref[sl]
        delta = delta_ref[sl]
        s = plgpu.dot(q, k.T) * qk_scale  # (bq, bk)
        p = jnp.exp2(s - lse[:, None])
        if ok is not None:
            p = jnp.where(ok[None, :], p, 0.0)
        dv = dv + plgpu.dot(p.astype(do.dtype).T, do)
        dp = plgpu.dot(do, v.T)
        ds = p * (dp - delta[:, None])
        dk = dk + plgpu.dot(ds.astype(q.dtype).T, q)
        return dk, dv

    zeros = jnp.zeros((bk, E), jnp.float32)
    dk, dv = lax.fori_loop(0, count * sub, body, (zeros, zeros))
    plgpu.store(dk_ref, (dk * st.scale).astype(dk_ref.dtype))
    plgpu.store(dv_ref, dv.astype(dv_ref.dtype))


def _table_spec(table: jax.Array, rows_per_block: int = 1):
    """BlockSpec for a (H', R, 1 + width) table: grid step i reads row i // rows_per_block (of head h if H' > 1)."""
    from jax.experimental import pallas as pl

    if table.shape[0] == 1:
        return pl.BlockSpec((None, None, table.shape[2]), lambda i, b, h: (0, i // rows_per_block, 0))
    return pl.BlockSpec((None, None, table.shape[2]), lambda i, b, h: (h, i // rows_per_block, 0))


def _bs_forward(q, k, v, valid, kv_table, st: _KernelStatic):
    from jax.experimental import pallas as pl

    B, Lq, N, E = q.shape
    Lk = k.shape[1]
    grid = (Lq // st.block_q, B, N)
    in_specs = [
        _table_spec(kv_table),
        pl.BlockSpec((None, st.block_q, None, E), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, Lk, None, E), lambda i, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, Lk, None, E), lambda i, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, Lk), lambda i, b, h: (b, 0)) if st.has_valid else None,
    ]
    out_specs = [
        pl.BlockSpec((None, st.block_q, None, E), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, None, st.block_q), lambda i, b, h: (b, h, i)),
    ]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, Lq), jnp.float32)]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st), grid=grid, in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=_compiler_params(st, st.block_q, st.block_k, E),
        interpret=st.interpret, name="block_sparse_attention_fwd",
    )(kv_table, q, k, v, valid)


def _bs_backward(q, k, v, valid, kv_table, q_table, out, lse, do, st: _KernelStatic):
    from jax.experimental import pallas as pl

    B, Lq, N, E = q.shape
    Lk = k.shape[1]
    delta = jnp.einsum("bqne,bqne->bnq", out.astype(jnp.float32), do.astype(jnp.float32))
    do = do.astype(q.dtype)
    valid_full = pl.BlockSpec((None, Lk), lambda i, b, h: (b, 0)) if st.has_valid else None
    full_q = pl.BlockSpec((None, Lq, None, E), lambda i, b, h: (b, 0, h, 0))
    full_k = pl.BlockSpec((None, Lk, None, E), lambda i, b, h: (b, 0, h, 0))
    row_q = pl.BlockSpec((None, None, Lq), lambda i, b, h: (b, h, 0))

    # dQ: grid over backward q blocks; each reads the forward table row of its enclosing forward q block.
    bq, bk = st.block_q_bwd, st.block_k_bwd
    kv_table_spec = _table_spec(kv_table, st.block_q // bq)
    blk_q = pl.BlockSpec((None, bq, None, E), lambda i, b, h: (b, i, h, 0))
    blk_row = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st), grid=(Lq // bq, B, N),
        in_specs=[kv_table_spec, blk_q, full_k, full_k, valid_full, blk_q, blk_row, blk_row],
        out_specs=blk_q, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(st, bq, bk, E), interpret=st.interpret,
        name="block_sparse_attention_dq",
    )(kv_table, q, k, v, valid, do, lse, delta)

    # dK/dV: grid over backward kv blocks, walking the transposed table.
    q_table_spec = _table_spec(q_table, st.block_k // bk)
    blk_k = pl.BlockSpec((None, bk, None, E), lambda i, b, h: (b, i, h, 0))
    valid_blk = pl.BlockSpec((None, bk), lambda i, b, h: (b, i)) if st.has_valid else None
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st), grid=(Lk // bk, B, N),
        in_specs=[q_table_spec, full_q, blk_k, blk_k, valid_blk, full_q, row_q, row_q],
        out_specs=[blk_k, blk_k],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(st, bq, bk, E), interpret=st.interpret,
        name="block_sparse_attention_dkv",
    )(q_table, q, k, v, valid, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _block_sparse_core(q, k, v, valid, kv_table, q_table, st: _KernelStatic):
    out, _ = _bs_forward(q, k, v, valid, kv_table, st)
    return out


def _core_fwd(q, k, v, valid, kv_table, q_table, st):
    out, lse = _bs_forward(q, k, v, valid, kv_table, st)
    return out, (q, k, v, valid, kv_table, q_table, out, lse)


def _core_bwd(st, res, do):
    q, k, v, valid, kv_table, q_table, out, lse = res
    dq, dk, dv = _bs_backward(q, k, v, valid, kv_table, q_table, out, lse, do, st)
    return dq, dk, dv, None, None, None


_block_sparse_core.defvjp(_core_fwd, _core_bwd)


def block_sparse_attention(
    q: jax.Array,  # (B, Lq, N, E), Lq a multiple of tables.block_q
    k: jax.Array,  # (B, Lk, N, E), Lk a multiple of tables.block_k
    v: jax.Array,
    kv_valid: jax.Array | None,  # (B, Lk) bool/int: False keys are never attended
    tables: BlockTables | tuple[jax.Array, jax.Array],
    *,
    scale: float | None = None,
    config: TritonConfig | None = None,
) -> jax.Array:
    """Flash attention that visits only the listed (q block, kv block) pairs. Differentiable.

    ``tables`` is a :class:`BlockTables` (static numpy) or a ``(kv_table, q_table)`` pair of int32 arrays in the
    same format (they may be traced, e.g. stacked per layer under a scan); block sizes then come from
    ``config.block_q`` / ``config.block_k``. Every query row must have at least one valid key in its blocks.
    """
    config = config or current_triton_config()
    if isinstance(tables, BlockTables):
        bq, bk = tables.block_q, tables.block_k
        kv_table, q_table = jnp.asarray(tables.kv), jnp.asarray(tables.q)
    else:
        bq, bk = config.block_q, config.block_k
        kv_table, q_table = (jnp.asarray(t, jnp.int32) for t in tables)
    B, Lq, N, E = q.shape
    Lk = k.shape[1]
    if Lq % bq or Lk % bk:
        raise ValueError(f"block_sparse_attention: lengths ({Lq}, {Lk}) must be multiples of blocks ({bq}, {bk})")
    if kv_table.shape[1] != Lq // bq or q_table.shape[1] != Lk // bk or kv_table.shape[0] not in (1, N):
        raise ValueError(f"block tables {kv_table.shape}/{q_table.shape} do not match q/k blocks "
                         f"({Lq // bq}, {Lk // bk}) and {N} heads")
    for name, b in (("block_q", bq), ("block_k", bk)):
        if not _is_pow2(b) or b < 16:
            raise ValueError(f"{name}={b} must be a power of two >= 16")
    bq_bwd, bk_bwd = min(config.block_q_bwd, bq), min(config.block_k_bwd, bk)
    scale = E ** -0.5 if scale is None else float(scale)
    Ep = _next_pow2(E)  # Triton tensor shapes are powers of two: zero-pad the head dim (exact)
    qp, kp, vp = (_pad_axis(t, 3, Ep) for t in (q, k, v))
    valid = None if kv_valid is None else jnp.asarray(kv_valid).astype(jnp.int32)
    st = _KernelStatic(scale, bq, bk, bq_bwd, bk_bwd, valid is not None, config.num_warps, config.num_stages,
                       config.interpret)
    out = _block_sparse_core(qp, kp, vp, valid, kv_table, q_table, st)
    return out[..., :E]


def dense_block_sparse_attention(q, k, v, kv_mask=None, *, scale=None, config: TritonConfig | None = None):
    """Dense attention on the block-sparse kernel (all blocks listed): any lengths, key-only masks."""
    config = config or current_triton_config()
    B, Lq, N, E = q.shape
    Lk = k.shape[1]
    Lqp, Lkp = round_up(Lq, config.block_q), round_up(Lk, config.block_k)
    qp = _pad_axis(q, 1, Lqp)
    kp, vp = _pad_axis(k, 1, Lkp), _pad_axis(v, 1, Lkp)
    valid = None
    if kv_mask is not None or Lkp != Lk:
        valid = jnp.ones((B, Lk), bool) if kv_mask is None else kv_mask.astype(bool)
        valid = _pad_axis(valid, 1, Lkp)
    tables = dense_block_tables(Lqp // config.block_q, Lkp // config.block_k, config.block_q, config.block_k)
    out = block_sparse_attention(qp, kp, vp, valid, tables, scale=scale, config=config)
    return out[:, :Lq]


# ==========================================================================================================
# Mosaic GPU (FA3, Hopper)
# ==========================================================================================================


def _mgpu_tuning(config: MosaicConfig):
    mod = _mgpu_module()
    return mod.TuningConfig(
        block_q=config.block_q, block_kv=config.block_kv, max_concurrent_steps=config.max_concurrent_steps,
        block_q_dkv=config.block_q_dkv, block_kv_dkv=config.block_kv_dkv,
        block_q_dq=config.block_q_dq, block_kv_dq=config.block_kv_dq,
    )


def _emulated_mgpu_fwd(q, k, v):
    """jnp model of ``attention_mgpu.attention(..., save_residuals=True)``: no scale, lse in log2 units."""
    s = jnp.einsum("bqne,bkne->bnqk", q, k, preferred_element_type=jnp.float32)
    m = s.max(-1, keepdims=True)
    p = jnp.exp(s - m)
    l = p.sum(-1, keepdims=True)
    out = jnp.einsum("bnqk,bkne->bqne", (p / l).astype(v.dtype), v, preferred_element_type=jnp.float32)
    lse = (m * LOG2E + jnp.log2(l))[..., 0]
    return out.astype(q.dtype), lse


def _emulated_mgpu_bwd(res, do):
    """jnp model of ``attention_mgpu._attention_bwd``: p = 2^(s log2e - lse), delta = rowsum(out * do)."""
    q, k, v, out, lse = res
    f32 = jnp.float32
    s = jnp.einsum("bqne,bkne->bnqk", q, k, preferred_element_type=f32) * LOG2E
    p = jnp.exp2(s - lse[..., None])
    delta = jnp.einsum("bqne,bqne->bnq", out.astype(f32), do.astype(f32))
    dp = jnp.einsum("bqne,bkne->bnqk", do, v, preferred_element_type=f32)
    ds = p * (dp - delta[..., None])
    dq = jnp.einsum("bnqk,bkne->bqne", ds.astype(k.dtype), k, preferred_element_type=f32)
    dk = jnp.einsum("bnqk,bqne->bkne", ds.astype(q.dtype), q, preferred_element_type=f32)
    dv = jnp.einsum("bnqk,bqne->bkne", p.astype(do.dtype), do, preferred_element_type=f32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _mosaic_fwd_raw(q, k, v, config: MosaicConfig):
    if config.emulate:
        return _emulated_mgpu_fwd(q, k, v)
    out, (lse,) = _mgpu_module().attention(q, k, v, _mgpu_tuning(config), save_residuals=True)
    return out, lse


def _corrected(out, lse, n_masked):
    """Remove ``n_masked`` zero-logit keys from the softmax: returns the valid-key output and lse (log2)."""
    ratio = n_masked.astype(jnp.float32)[:, None, None] * jnp.exp2(-lse)  # (B, N, Lq)
    keep = jnp.maximum(1.0 - ratio, jnp.finfo(jnp.float32).tiny)
    lse_true = lse + jnp.log2(keep)
    factor = jnp.transpose(1.0 / keep, (0, 2, 1))[..., None]  # (B, Lq, N, 1)
    return (out.astype(jnp.float32) * factor).astype(out.dtype), lse_true


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _mosaic_core(q, k, v, n_masked, config: MosaicConfig):
    out, lse = _mosaic_fwd_raw(q, k, v, config)
    return _corrected(out, lse, n_masked)[0]


def _mosaic_core_fwd(q, k, v, n_masked, config):
    out, lse = _mosaic_fwd_raw(q, k, v, config)
    out, lse = _corrected(out, lse, n_masked)
    return out, (q, k, v, out, lse)


def _mosaic_core_bwd(config, res, do):
    do = do.astype(res[0].dtype)
    if config.emulate:
        dq, dk, dv = _emulated_mgpu_bwd(res, do)
    else:
        dq, dk, dv = _mgpu_module()._attention_bwd(_mgpu_tuning(config), False, res, do)
    return dq, dk, dv, None


_mosaic_core.defvjp(_mosaic_core_fwd, _mosaic_core_bwd)


def mosaic_attention(q, k, v, kv_mask=None, scale=None, *, config: MosaicConfig | None = None):
    """Dense attention on the Mosaic-GPU FA3 kernel (sm90), any lengths, optional key mask. Differentiable."""
    config = config or current_mosaic_config()
    reason = check_mosaic(q, k, v, kv_mask, config)
    if reason is not None:
        raise ValueError(f"mosaic_attention: {reason}")
    out_dtype = q.dtype
    B, Lq, N, E = q.shape
    Lk = k.shape[1]
    scale = E ** -0.5 if scale is None else float(scale)
    Lqp = round_up(Lq, config.q_multiple)
    Lkp = max(round_up(Lk, config.kv_multiple), config.max_concurrent_steps * config.block_kv)

    def to16(x, s=1.0):
        x = x.astype(jnp.float32) * s if s != 1.0 else x.astype(jnp.float32)
        return jnp.clip(x, -FP16_MAX, FP16_MAX).astype(jnp.float16)

    qs = _pad_axis(to16(q, scale), 1, Lqp)  # the kernel applies no softmax scale
    valid = jnp.ones((B, Lk), bool) if kv_mask is None else kv_mask.astype(bool)
    keep = valid[:, :, None, None]
    kz = _pad_axis(jnp.where(keep, to16(k), 0), 1, Lkp)
    vz = _pad_axis(jnp.where(keep, to16(v), 0), 1, Lkp)
    n_masked = (Lkp - valid.sum(-1)).astype(jnp.int32)
    out = _mosaic_core(qs, kz, vz, n_masked, config)
    return out[:, :Lq].astype(out_dtype)
