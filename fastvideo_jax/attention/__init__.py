from fastvideo_jax.attention.api import AttentionBackend, attention, default_backend, register_backend, resolve_backend
from fastvideo_jax.attention.block_sparse_gpu import block_sparse_attention
from fastvideo_jax.attention.pallas_gpu import MosaicConfig, TritonConfig, mosaic_config_scope, triton_config_scope
from fastvideo_jax.attention.reference import reference_attention
from fastvideo_jax.attention.sage import SageConfig, sage_attention, sage_config_scope
from fastvideo_jax.attention.sliding_tile import (
    FULL_WINDOW,
    resolve_sta_backend,
    sliding_tile_attention,
    sta_reference_dense,
)
from fastvideo_jax.attention.sliding_tile_mask import TileGeometry
from fastvideo_jax.attention.sliding_tile_strategy import MaskStrategy, load_mask_strategy
from fastvideo_jax.attention.splash_tpu import SplashConfig
from fastvideo_jax.attention.splash_tpu import config_scope as splash_config_scope
from fastvideo_jax.attention.topk_block_sparse import TopkBackend, topk_block_sparse_attention
from fastvideo_jax.attention.tokamax_dpa import TokamaxConfig, tokamax_config_scope
from fastvideo_jax.attention.video_sparse import video_sparse_attention

__all__ = [
    "AttentionBackend",
    "FULL_WINDOW",
    "MaskStrategy",
    "MosaicConfig",
    "SageConfig",
    "SplashConfig",
    "TileGeometry",
    "TokamaxConfig",
    "TopkBackend",
    "TritonConfig",
    "attention",
    "block_sparse_attention",
    "default_backend",
    "load_mask_strategy",
    "mosaic_config_scope",
    "reference_attention",
    "register_backend",
    "resolve_backend",
    "resolve_sta_backend",
    "sage_attention",
    "sage_config_scope",
    "sliding_tile_attention",
    "splash_config_scope",
    "sta_reference_dense",
    "tokamax_config_scope",
    "topk_block_sparse_attention",
    "triton_config_scope",
    "video_sparse_attention",
]
