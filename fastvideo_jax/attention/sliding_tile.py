"""Sliding-tile attention (STA, FastVideo / arXiv 2502.04507) for the DiT's (B, L, N, E) tokens.

Call it from a DiT self-attention layer with the latent token grid and that layer's windows::

    out = sliding_tile_attention(q, k, v, grid=(T, H, W), window=windows, tile=(6, 8, 8),
                                 text_len=0, backend=None)

``q/k/v`` hold the video tokens in row-major (t, h, w) order, optionally followed by ``text_len`` text tokens
(joint attention, e.g. HunyuanVideo; ``text_mask`` (B, text_len) marks valid ones). ``window`` is one
(wt, wh, ww) in tiles for all heads or a tuple with one window per head (FastVideo mask-strategy JSON:
``load_mask_strategy(path).windows(step, layer)``). The tokens are permuted to tile-major order inside, the
block-sparse kernel runs, and the output is returned in the caller's order. Windows, grid and tile are static
(Python ints): each distinct per-layer window set is its own compiled kernel configuration.

Implementations (``backend``):

* ``SPLASH_TPU``: splash with a lazy per-head STA mask (block-level, never a dense token mask).
* ``PALLAS_GPU_TRITON``: our block-sparse Pallas/Triton kernel (per q block, only the kv blocks in its window).
* ``REFERENCE``: jnp, q block by q block over the gathered window blocks (memory O(L x window), any platform).
* ``None``: the platform's best of the above.

Anything else, or a backend whose capability check fails, falls back to ``REFERENCE`` with a logged warning.
The oracle for tests is :func:`sta_reference_dense` (dense softmax under the token mask built from coordinates).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fastvideo_jax.attention._common import platform, warn_once
from fastvideo_jax.attention import block_sparse_gpu, pallas_gpu, splash_tpu
from fastvideo_jax.attention.api import AttentionBackend
from fastvideo_jax.attention.sliding_tile_mask import (
    DEFAULT_TILE,
    FULL_WINDOW,
    Int3,
    TileGeometry,
    choose_tile,
    dense_token_mask,
    normalize_windows,
    slot_valid,
    sta_block_tables,
    sta_density,
    tile_permutation,
)
from fastvideo_jax.attention.sliding_tile_splash_mask import make_splash_sta_mask
from fastvideo_jax.attention.sliding_tile_strategy import MaskStrategy, load_mask_strategy


__all__ = [
    "FULL_WINDOW", "MaskStrategy", "TileGeometry", "auto_sta_tile", "from_tile_major", "load_mask_strategy",
    "palette_tables", "resolve_sta_backend", "sliding_tile_attention", "sta_density", "sta_geometry",
    "sta_reference_dense", "tile_permutation", "to_tile_major",
]


# ----------------------------------------------------------------------------------------------------------
# Layout: row-major <-> tile-major (pad + reshape + transpose; static per shape)
# ----------------------------------------------------------------------------------------------------------


def to_tile_major(x: jax.Array, geom: TileGeometry) -> jax.Array:
    """(B, T*H*W [+ text], ...) row-major -> (B, padded_len, ...) tile-major, padding zero-filled."""
    B, L = x.shape[:2]
    rest = x.shape[2:]
    if L != geom.seq_len:
        raise ValueError(f"sequence length {L} != T*H*W + text_len = {geom.seq_len} for grid {geom.grid}")
    T, H, W = geom.grid
    tt, th, tw = geom.tile
    nT, nH, nW = geom.tile_grid
    r = len(rest)
    video = x[:, : geom.video_len].reshape(B, T, H, W, *rest)
    video = jnp.pad(video, ((0, 0), (0, nT * tt - T), (0, nH * th - H), (0, nW * tw - W)) + ((0, 0),) * r)
    video = video.reshape(B, nT, tt, nH, th, nW, tw, *rest)
    video = video.transpose(0, 1, 3, 5, 2, 4, 6, *range(7, 7 + r))
    video = video.reshape(B, geom.num_tiles, geom.tile_tokens, *rest)
    video = jnp.pad(video, ((0, 0), (0, 0), (0, geom.slot - geom.tile_tokens)) + ((0, 0),) * r)
    video = video.reshape(B, geom.padded_video_len, *rest)
    if not geom.text_len:
        return video
    text = jnp.pad(x[:, geom.video_len:], ((0, 0), (0, geom.padded_text_len - geom.text_len)) + ((0, 0),) * r)
    return jnp.concatenate([video, text], axis=1)


def from_tile_major(y: jax.Array, geom: TileGeometry) -> jax.Array:
    """Inverse of :func:`to_tile_major` (padding dropped)."""
    B = y.shape[0]
    rest = y.shape[2:]
    r = len(rest)
    T, H, W = geom.grid
    tt, th, tw = geom.tile
    nT, nH, nW = geom.tile_grid
    video = y[:, : geom.padded_video_len].reshape(B, geom.num_tiles, geom.slot, *rest)[:, :, : geom.tile_tokens]
    video = video.reshape(B, nT, nH, nW, tt, th, tw, *rest)
    video = video.transpose(0, 1, 4, 2, 5, 3, 6, *range(7, 7 + r))
    video = video.reshape(B, nT * tt, nH * th, nW * tw, *rest)[:, :T, :H, :W]
    video = video.reshape(B, geom.video_len, *rest)
    if not geom.text_len:
        return video
    text = y[:, geom.padded_video_len: geom.padded_video_len + geom.text_len]
    return jnp.concatenate([video, text], axis=1)


def sta_geometry(grid, tile=DEFAULT_TILE, text_len: int = 0, backend: AttentionBackend | None = None,
                 triton_config: pallas_gpu.TritonConfig | None = None) -> TileGeometry:
    """The tile-major layout a backend uses (slot alignment: splash 128, Triton max(block_q, block_k))."""
    if backend is AttentionBackend.SPLASH_TPU:
        align = splash_tpu.NUM_LANES
    elif backend is AttentionBackend.PALLAS_GPU_TRITON:
        align = (triton_config or pallas_gpu.current_triton_config()).multiple
    else:
        align = 1
    return TileGeometry(tuple(grid), tuple(tile), int(text_len), align)


def auto_sta_tile(grid, like, base=DEFAULT_TILE, backend: AttentionBackend | None = None) -> tuple[int, int, int]:
    """The tile that pads ``grid`` least on the backend that will run q/k/v shaped like ``like`` (B, L, N, E)."""
    chosen = resolve_sta_backend(backend, like, like, like)
    return choose_tile(tuple(grid), tuple(base), sta_geometry(grid, base, 0, chosen).align)


# ----------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------

_STA_IMPLS = (AttentionBackend.REFERENCE, AttentionBackend.SPLASH_TPU, AttentionBackend.PALLAS_GPU_TRITON)


_STA_PLATFORM_DEFAULTS = {"tpu": AttentionBackend.SPLASH_TPU, "gpu": AttentionBackend.PALLAS_GPU_TRITON}


def _default_sta_backend() -> AttentionBackend:
    return _STA_PLATFORM_DEFAULTS.get(platform(), AttentionBackend.REFERENCE)


def _check(backend: AttentionBackend, q, k, v, splash_config, triton_config) -> str | None:
    if backend is AttentionBackend.REFERENCE:
        return None
    if backend is AttentionBackend.SPLASH_TPU:
        cfg = splash_config or splash_tpu.current_config()
        if not cfg.interpret and platform() != "tpu":
            return f"needs a TPU or interpret=True (platform is {platform()})"
        if q.dtype not in (jnp.float32, jnp.bfloat16):
            return f"needs fp32/bf16 inputs (got {q.dtype})"
        if q.shape[-1] > cfg.max_head_dim or q.shape[-1] % splash_tpu.SUBLANES:
            return f"head dim {q.shape[-1]} unsupported"
        return None
    if backend is AttentionBackend.PALLAS_GPU_TRITON:
        return pallas_gpu.check_triton(q, k, v, None, triton_config)
    return "has no block-sparse implementation (STA runs on SPLASH_TPU, PALLAS_GPU_TRITON or REFERENCE)"


def resolve_sta_backend(requested, q, k=None, v=None, *, splash_config=None, triton_config=None) -> AttentionBackend:
    """The implementation that will run this STA call: the requested one if capable, else REFERENCE (logged)."""
    backend = AttentionBackend.parse(requested)
    if backend is None:
        backend = _default_sta_backend()
    reason = _check(backend, q, k, v, splash_config, triton_config)
    if reason is None:
        return backend
    warn_once(f"sliding-tile attention on {backend.value} cannot run this call ({reason}); falling back to reference")
    return AttentionBackend.REFERENCE


# ----------------------------------------------------------------------------------------------------------
# Implementations (inputs already tile-major and padded)
# ----------------------------------------------------------------------------------------------------------


def _valid_mask(geom: TileGeometry, batch: int, text_mask: jax.Array | None) -> jax.Array | None:
    """(B, padded_len) bool key validity, or None when every position is a real, valid token."""
    static = slot_valid(geom)
    if text_mask is None and static.all():
        return None
    valid = jnp.broadcast_to(jnp.asarray(static), (batch, geom.padded_len))
    if text_mask is not None:
        t0 = geom.padded_video_len
        valid = valid.at[:, t0: t0 + geom.text_len].set(text_mask.astype(bool))
    return valid


def _gathered_reference(qt, kt, vt, valid, geom: TileGeometry, kv_table, scale: float) -> jax.Array:
    """STA in jnp: for each q block (one tile slot), softmax over the gathered blocks of its window.

    ``kv_table``: int32 (H', num_blocks, 1 + max_kv) block table with block = slot (may be traced)."""
    block = geom.slot
    B, Lp, N, E = qt.shape
    nb = Lp // block
    kv_table = jnp.broadcast_to(jnp.asarray(kv_table, jnp.int32), (N,) + tuple(kv_table.shape[1:]))
    ids, cnt = kv_table[..., 1:], kv_table[..., 0]  # (N, nb, maxK), (N, nb)
    qb = qt.reshape(B, nb, block, N, E).swapaxes(0, 1)  # (nb, B, block, N, E)
    kb = kt.reshape(B, nb, block, N, E)
    vb = vt.reshape(B, nb, block, N, E)
    validb = None if valid is None else valid.reshape(B, nb, block)
    heads = jnp.arange(N)[:, None]

    @jax.checkpoint
    def step(args):
        qi, ids_i, cnt_i = args  # (B, block, N, E), (N, maxK), (N,)
        kg = kb[:, ids_i, :, heads, :]  # (N, maxK, B, block, E)
        vg = vb[:, ids_i, :, heads, :]
        s = jnp.einsum("bqne,nkbse->bnqks", qi, kg, preferred_element_type=jnp.float32) * scale
        ok = (jnp.arange(ids_i.shape[1])[None, :] < cnt_i[:, None])[None, :, None, :, None]  # (1, N, 1, maxK, 1)
        if validb is not None:
            ok = ok & validb[:, ids_i][:, :, None, :, :]  # (B, N, 1, maxK, block)
        s = jnp.where(ok, s, jnp.finfo(jnp.float32).min)
        shape = s.shape
        p = jax.nn.softmax(s.reshape(*shape[:3], -1), axis=-1).reshape(shape)
        out = jnp.einsum("bnqks,nkbse->bqne", p.astype(vt.dtype), vg, preferred_element_type=jnp.float32)
        return out.astype(qt.dtype)

    per_block = B * N * block * ids.shape[-1] * block * 4 * 3  # logits + probs + mask, bytes
    batch_size = max(1, min(nb, (256 << 20) // max(per_block, 1)))
    out = jax.lax.map(step, (qb, ids.swapaxes(0, 1), cnt.swapaxes(0, 1)), batch_size=batch_size)
    return out.swapaxes(0, 1).reshape(B, Lp, N, E)


@functools.lru_cache(maxsize=32)
def palette_tables(geom: TileGeometry, palette: tuple[tuple[Int3, ...], ...], block_q: int, block_k: int,
                   prune_padding: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Block tables of every window set in ``palette``, stacked: kv (K, H', nQb, 1 + max_kv), q (K, H', nKb, ...).

    Widths are padded to the widest entry by repeating the last id (the count column keeps each entry exact);
    ``H'`` is 1 when every entry has one mask for all heads, else the number of heads."""
    tabs = [sta_block_tables(geom, windows, block_q, block_k, prune_padding=prune_padding) for windows in palette]
    heads = max(t.num_heads for t in tabs)

    def stack(arrays):
        width = max(a.shape[2] for a in arrays)
        pad = ((0, 0), (0, 0), (0, 0))
        return np.stack([np.pad(np.broadcast_to(a, (heads,) + a.shape[1:]), pad[:2] + ((0, width - a.shape[2]),),
                                mode="edge") for a in arrays])

    kv, q = stack([t.kv for t in tabs]), stack([t.q for t in tabs])
    kv.setflags(write=False)
    q.setflags(write=False)
    return kv, q


def _splash_sta(qt, kt, vt, valid, geom, windows, scale, config, mesh, head_axis, batch_axes):
    B, Lp, N, E = qt.shape
    cur = config or splash_tpu.current_config()
    if config is None:  # one tile slot per block: every block is fully inside or outside the window
        config = splash_tpu.SplashConfig(block_q=geom.slot, block_kv=geom.slot, interpret=cur.interpret,
                                          use_fused_bwd_kernel=cur.use_fused_bwd_kernel,
                                          pad_head_dim=cur.pad_head_dim, max_head_dim=cur.max_head_dim)
    Ep = config.padded_head_dim(E)
    config.validate(Lp, Lp, Ep)
    qs = (qt.astype(jnp.float32) * scale).astype(qt.dtype)

    def prep(x):
        return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, 0), (0, Ep - E)))

    masks = {w: make_splash_sta_mask(geom, w) for w in set(windows)}
    kv_segment = None if valid is None else jnp.where(valid, 0, 1).astype(jnp.int32)
    if mesh is None and splash_tpu.current_mesh() is not None:
        mesh, head_axis, batch_axes = splash_tpu.current_mesh()
    out = splash_tpu.splash_masked(prep(qs), prep(kt), prep(vt), kv_segment, tuple(masks[w] for w in windows),
                                   config, mesh, head_axis, batch_axes)
    return jnp.swapaxes(out[..., :E], 1, 2).astype(qt.dtype)


def _triton_sta(qt, kt, vt, valid, geom, palette, index, scale, config):
    config = config or pallas_gpu.current_triton_config()
    kv, q = palette_tables(geom, palette, config.block_q, config.block_k, prune_padding=True)
    tables = (jnp.asarray(kv)[index], jnp.asarray(q)[index])
    return block_sparse_gpu.block_sparse_attention(qt, kt, vt, valid, tables, scale=scale, config=config)


def _reference_sta(qt, kt, vt, valid, geom, palette, index, scale):
    kv, _ = palette_tables(geom, palette, geom.slot, geom.slot)
    return _gathered_reference(qt, kt, vt, valid, geom, jnp.asarray(kv)[index], scale)


def _splash_palette(qt, kt, vt, valid, geom, palette, index, scale, config, mesh, head_axis, batch_axes):
    """Splash masks are static: one branch per window set, chosen by ``index`` at run time."""

    def branch(windows):
        return lambda: _splash_sta(qt, kt, vt, valid, geom, windows, scale, config, mesh, head_axis, batch_axes)

    if len(palette) == 1:
        return branch(palette[0])()
    return jax.lax.switch(index, [branch(w) for w in palette])


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def sliding_tile_attention(
    q: jax.Array,  # (B, L, N, E), L = T*H*W + text_len, video row-major then text
    k: jax.Array,
    v: jax.Array,
    *,
    grid: Sequence[int],
    window=None,  # (wt, wh, ww) in tiles, or one such window per head
    palette: Sequence | None = None,  # instead of ``window``: static window sets, ``palette[index]`` is used
    index: jax.Array | int = 0,  # int32 scalar, may be traced (e.g. a per-layer table under a scan)
    tile: Sequence[int] = DEFAULT_TILE,
    text_len: int = 0,
    text_mask: jax.Array | None = None,  # (B, text_len) bool
    scale: float | None = None,
    backend: AttentionBackend | None = None,
    splash_config: splash_tpu.SplashConfig | None = None,
    triton_config: pallas_gpu.TritonConfig | None = None,
    mesh=None,
    head_axis: str = "tensor",
    batch_axes=("data", "fsdp"),
) -> jax.Array:  # (B, L, N, E), caller's order
    """STA with one window set (``window``), or with ``palette[index]`` chosen at run time: the window sets are
    static (their block tables are stacked constants, or splash branches), the choice is data, so layers or
    denoising steps with different windows share one compiled kernel configuration."""
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"sliding_tile_attention expects equal (B, L, N, E) q/k/v, got {q.shape}, {k.shape}, {v.shape}")
    B, L, N, E = q.shape
    if (window is None) == (palette is None):
        raise ValueError("sliding_tile_attention needs exactly one of window= or palette= (windows in tiles)")
    palette = (normalize_windows(window, N),) if window is not None else tuple(normalize_windows(w, N) for w in palette)
    if not palette:
        raise ValueError("sliding_tile_attention: empty palette")
    if text_mask is not None and (text_len == 0 or text_mask.shape != (B, text_len)):
        raise ValueError(f"text_mask must be (B, text_len) = {(B, text_len)}, got {getattr(text_mask, 'shape', None)}")
    chosen = resolve_sta_backend(backend, q, k, v, splash_config=splash_config, triton_config=triton_config)
    geom = sta_geometry(grid, tile, text_len, chosen, triton_config)
    if L != geom.seq_len:
        raise ValueError(f"sequence length {L} != T*H*W + text_len = {geom.seq_len} for grid {geom.grid}")
    scale = E ** -0.5 if scale is None else float(scale)
    index = jnp.asarray(index, jnp.int32)
    qt, kt, vt = (to_tile_major(x, geom) for x in (q, k, v))
    valid = _valid_mask(geom, B, text_mask)
    if chosen is AttentionBackend.SPLASH_TPU:
        out = _splash_palette(qt, kt, vt, valid, geom, palette, index, scale, splash_config, mesh, head_axis,
                              batch_axes)
    elif chosen is AttentionBackend.PALLAS_GPU_TRITON:
        out = _triton_sta(qt, kt, vt, valid, geom, palette, index, scale, triton_config)
    else:
        out = _reference_sta(qt, kt, vt, valid, geom, palette, index, scale)
    return from_tile_major(out, geom)


def sta_reference_dense(q, k, v, *, grid, window, tile=DEFAULT_TILE, text_len: int = 0, text_mask=None,
                        scale: float | None = None) -> jax.Array:
    """Oracle: dense softmax attention under the STA token mask built from token coordinates (small shapes)."""
    B, L, N, E = q.shape
    geom = TileGeometry(tuple(grid), tuple(tile), int(text_len))
    windows = normalize_windows(window, N)
    mask = jnp.asarray(np.stack([dense_token_mask(geom, w) for w in windows]))[None]  # (1, N, L, L)
    if text_mask is not None:
        kv_ok = jnp.concatenate([jnp.ones((B, geom.video_len), bool), text_mask.astype(bool)], axis=1)
        mask = mask & kv_ok[:, None, None, :]
    scale = E ** -0.5 if scale is None else scale
    s = jnp.einsum("bqne,bkne->bnqk", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bnqk,bkne->bqne", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)
