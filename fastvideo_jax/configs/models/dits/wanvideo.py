"""Wan2.1 / Wan2.2 DiT configuration: checkpoint fields, name mappings and presets."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from fastvideo_jax.configs.models.base import derived, internal
from fastvideo_jax.configs.models.dits.base import REMAT_POLICY_NAMES, DiTArchConfig, NameMapping, SlidingTileDiTConfig

_B = r"^blocks\.(\d+)\."

# Diffusers name -> FastVideo / our module name (first match wins; unmatched names map to themselves).
WAN_PARAM_NAMES_MAPPING: NameMapping = (
    (r"^patch_embedding\.(.*)$", r"patch_embedding.proj.\1"),
    (r"^condition_embedder\.text_embedder\.linear_1\.(.*)$", r"condition_embedder.text_embedder.fc_in.\1"),
    (r"^condition_embedder\.text_embedder\.linear_2\.(.*)$", r"condition_embedder.text_embedder.fc_out.\1"),
    (r"^condition_embedder\.time_embedder\.linear_1\.(.*)$", r"condition_embedder.time_embedder.mlp.fc_in.\1"),
    (r"^condition_embedder\.time_embedder\.linear_2\.(.*)$", r"condition_embedder.time_embedder.mlp.fc_out.\1"),
    (r"^condition_embedder\.time_proj\.(.*)$", r"condition_embedder.time_modulation.linear.\1"),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.(.*)$", r"condition_embedder.image_embedder.ff.fc_in.\1"),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.(.*)$", r"condition_embedder.image_embedder.ff.fc_out.\1"),
    (_B + r"attn1\.to_q\.(.*)$", r"blocks.\1.to_q.\2"),
    (_B + r"attn1\.to_k\.(.*)$", r"blocks.\1.to_k.\2"),
    (_B + r"attn1\.to_v\.(.*)$", r"blocks.\1.to_v.\2"),
    (_B + r"attn1\.to_out\.0\.(.*)$", r"blocks.\1.to_out.\2"),
    (_B + r"attn1\.norm_q\.(.*)$", r"blocks.\1.norm_q.\2"),
    (_B + r"attn1\.norm_k\.(.*)$", r"blocks.\1.norm_k.\2"),
    (_B + r"attn2\.to_out\.0\.(.*)$", r"blocks.\1.attn2.to_out.\2"),
    (_B + r"ffn\.net\.0\.proj\.(.*)$", r"blocks.\1.ffn.fc_in.\2"),
    (_B + r"ffn\.net\.2\.(.*)$", r"blocks.\1.ffn.fc_out.\2"),
    (_B + r"norm2\.(.*)$", r"blocks.\1.self_attn_residual_norm.norm.\2"),
)

# Our module name -> Diffusers name, for export.
WAN_REVERSE_PARAM_NAMES_MAPPING: NameMapping = (
    (r"^patch_embedding\.proj\.(.*)$", r"patch_embedding.\1"),
    (r"^condition_embedder\.text_embedder\.fc_in\.(.*)$", r"condition_embedder.text_embedder.linear_1.\1"),
    (r"^condition_embedder\.text_embedder\.fc_out\.(.*)$", r"condition_embedder.text_embedder.linear_2.\1"),
    (r"^condition_embedder\.time_embedder\.mlp\.fc_in\.(.*)$", r"condition_embedder.time_embedder.linear_1.\1"),
    (r"^condition_embedder\.time_embedder\.mlp\.fc_out\.(.*)$", r"condition_embedder.time_embedder.linear_2.\1"),
    (r"^condition_embedder\.time_modulation\.linear\.(.*)$", r"condition_embedder.time_proj.\1"),
    (r"^condition_embedder\.image_embedder\.ff\.fc_in\.(.*)$", r"condition_embedder.image_embedder.ff.net.0.proj.\1"),
    (r"^condition_embedder\.image_embedder\.ff\.fc_out\.(.*)$", r"condition_embedder.image_embedder.ff.net.2.\1"),
    (_B + r"(to_q|to_k|to_v|norm_q|norm_k)\.(.*)$", r"blocks.\1.attn1.\2.\3"),
    (_B + r"to_out\.(.*)$", r"blocks.\1.attn1.to_out.0.\2"),
    (_B + r"attn2\.to_out\.(.*)$", r"blocks.\1.attn2.to_out.0.\2"),
    (_B + r"ffn\.fc_in\.(.*)$", r"blocks.\1.ffn.net.0.proj.\2"),
    (_B + r"ffn\.fc_out\.(.*)$", r"blocks.\1.ffn.net.2.\2"),
    (_B + r"self_attn_residual_norm\.norm\.(.*)$", r"blocks.\1.norm2.\2"),
)

# Original Wan (non-Diffusers) and kohya/musubi LoRA names -> Diffusers names; applied before
# WAN_PARAM_NAMES_MAPPING.
WAN_LORA_PARAM_NAMES_MAPPING: NameMapping = (
    (_B + r"self_attn\.(q|k|v)\.(.*)$", r"blocks.\1.attn1.to_\2.\3"),
    (_B + r"self_attn\.o\.(.*)$", r"blocks.\1.attn1.to_out.0.\2"),
    (_B + r"cross_attn\.(q|k|v)\.(.*)$", r"blocks.\1.attn2.to_\2.\3"),
    (_B + r"cross_attn\.o\.(.*)$", r"blocks.\1.attn2.to_out.0.\2"),
    (_B + r"ffn\.0\.(.*)$", r"blocks.\1.ffn.net.0.proj.\2"),
    (_B + r"ffn\.2\.(.*)$", r"blocks.\1.ffn.net.2.\2"),
    # beyond FastVideo's table: the layers diffusers' non-Diffusers Wan LoRA converter also maps
    (_B + r"cross_attn\.k_img\.(.*)$", r"blocks.\1.attn2.add_k_proj.\2"),
    (_B + r"cross_attn\.v_img\.(.*)$", r"blocks.\1.attn2.add_v_proj.\2"),
    (r"^text_embedding\.0\.(.*)$", r"condition_embedder.text_embedder.linear_1.\1"),
    (r"^text_embedding\.2\.(.*)$", r"condition_embedder.text_embedder.linear_2.\1"),
    (r"^time_embedding\.0\.(.*)$", r"condition_embedder.time_embedder.linear_1.\1"),
    (r"^time_embedding\.2\.(.*)$", r"condition_embedder.time_embedder.linear_2.\1"),
    (r"^time_projection\.1\.(.*)$", r"condition_embedder.time_proj.\1"),
    (r"^img_emb\.proj\.1\.(.*)$", r"condition_embedder.image_embedder.ff.net.0.proj.\1"),
    (r"^img_emb\.proj\.3\.(.*)$", r"condition_embedder.image_embedder.ff.net.2.\1"),
    (r"^head\.head\.(.*)$", r"proj_out.\1"),
    # kohya / musubi-tuner names (dots flattened to underscores under ``lora_unet_``), as diffusers converts them
    (r"^lora_unet_blocks_(\d+)_self_attn_(q|k|v)\.(.*)$", r"blocks.\1.attn1.to_\2.\3"),
    (r"^lora_unet_blocks_(\d+)_self_attn_o\.(.*)$", r"blocks.\1.attn1.to_out.0.\2"),
    (r"^lora_unet_blocks_(\d+)_cross_attn_(q|k|v)\.(.*)$", r"blocks.\1.attn2.to_\2.\3"),
    (r"^lora_unet_blocks_(\d+)_cross_attn_o\.(.*)$", r"blocks.\1.attn2.to_out.0.\2"),
    (r"^lora_unet_blocks_(\d+)_cross_attn_k_img\.(.*)$", r"blocks.\1.attn2.add_k_proj.\2"),
    (r"^lora_unet_blocks_(\d+)_cross_attn_v_img\.(.*)$", r"blocks.\1.attn2.add_v_proj.\2"),
    (r"^lora_unet_blocks_(\d+)_ffn_0\.(.*)$", r"blocks.\1.ffn.net.0.proj.\2"),
    (r"^lora_unet_blocks_(\d+)_ffn_2\.(.*)$", r"blocks.\1.ffn.net.2.\2"),
)


@dataclasses.dataclass(frozen=True)
class WanVideoArchConfig(DiTArchConfig):
    """``WanTransformer3DModel`` config.json fields. Defaults are the 14B shape, as in FastVideo."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    param_names_mapping: NameMapping = internal(WAN_PARAM_NAMES_MAPPING)
    reverse_param_names_mapping: NameMapping = internal(WAN_REVERSE_PARAM_NAMES_MAPPING)
    lora_param_names_mapping: NameMapping = internal(WAN_LORA_PARAM_NAMES_MAPPING)
    scanned_prefixes: tuple[str, ...] = internal(("blocks",))
    exclude_lora_layers: tuple[str, ...] = internal(("embedder",))
    # Attention (self and cross; the I2V image keys/values; VSA's gate, as FastVideo) and FFN projections, in our
    # module names.
    lora_target_modules: tuple[str, ...] = internal(
        ("to_q", "to_k", "to_v", "to_out", "add_k_proj", "add_v_proj", "to_gate_compress", "ffn.fc_in",
         "ffn.fc_out"))
    # Checkpoint tensors that diffusers drops on load; we consume and drop them too, by name.
    ignored_param_patterns: tuple[str, ...] = internal((r".*\.norm_added_q\..*",))
    # FastWan's per-block gates exist only in the video sparse attention mode.
    checkpoint_implied_config: tuple = internal(
        ((r"(^|\.)to_gate_compress\.", (("attention_backend", "video_sparse_attn"),)),))
    # A checkpoint/model mismatch about these tensors gets this hint in the loader's error.
    unexpected_param_hints: tuple[tuple[str, str], ...] = internal((
        (r"to_gate_compress",
         "to_gate_compress is video sparse attention's per-block gate: FastWan (VSA-trained) checkpoints carry it "
         "and load with attention_backend='video_sparse_attn' (the FastWan presets set it); other Wan checkpoints "
         "have none and load with dense attention"),
    ))

    hidden_size: int = derived(0)
    num_channels_latents: int = derived(0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "hidden_size", self.num_attention_heads * self.attention_head_dim)
        object.__setattr__(self, "out_channels", self.out_channels or self.in_channels)
        object.__setattr__(self, "num_channels_latents", self.out_channels)
        if self.qk_norm not in (None, "rms_norm_across_heads"):
            raise ValueError(f"WanVideoArchConfig: qk_norm={self.qk_norm!r} is not supported (rms_norm_across_heads)")
        if len(self.patch_size) != 3:
            raise ValueError(f"WanVideoArchConfig: patch_size must have 3 entries, got {self.patch_size}")
        if self.attention_head_dim % 2:
            raise ValueError(f"WanVideoArchConfig: attention_head_dim must be even, got {self.attention_head_dim}")


@dataclasses.dataclass(frozen=True)
class WanVideoConfig(SlidingTileDiTConfig):
    """Wan DiT knobs; sliding-tile self-attention fields: see ``SlidingTileDiTConfig`` (cross-attention stays
    dense; per-step windows: ``WanPipeline(..., mask_strategy=...)``).

    Video sparse attention (``attention_backend="video_sparse_attn"`` or ``"video_sparse"``, FastWan): every
    block has FastVideo's ``to_gate_compress`` projection and runs ``video_sparse_attention`` in self-attention
    (cross-attention stays dense) at ``vsa_sparsity``. That value also fixes the compiled top-k width: a call may
    pass a higher ``vsa_sparsity`` (data: no recompile), never a lower one."""

    arch_config: WanVideoArchConfig = dataclasses.field(default_factory=WanVideoArchConfig)
    prefix: str = "Wan"
    vsa_sparsity: float = 0.0
    # Rematerialisation of the scanned blocks when the forward is differentiated (training): "none", "full" or
    # "dots" (``models/layers/remat.py``). Inference never differentiates, so it has no effect there.
    remat: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.remat not in REMAT_POLICY_NAMES:
            raise ValueError(f"{type(self).__name__}: remat={self.remat!r} is not one of {', '.join(REMAT_POLICY_NAMES)}")


# Presets as data: config.json contents. ``tiny`` builds in milliseconds (tests, CLI smoke runs, notebooks).
WAN_PRESETS = MappingProxyType(
    {
        "tiny": dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ),
        # Tiny twins of the other Wan layouts (tiny pipelines: UMT5 d_model 32, tiny CLIP vision hidden 24):
        # Wan2.1 I2V (36 channels + CLIP image branch), Wan2.2 TI2V (48 channels), an A14B I2V expert (36, no CLIP).
        "tiny-i2v": dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=24, added_kv_proj_dim=24,
        ),
        "tiny-ti2v": dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=48, out_channels=48,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ),
        "tiny-i2v-a14b": dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ),
        "wan2.1-t2v-1.3b": dict(
            num_attention_heads=12, attention_head_dim=128, text_dim=4096, ffn_dim=8960, num_layers=30,
        ),
        "wan2.1-t2v-14b": dict(
            num_attention_heads=40, attention_head_dim=128, text_dim=4096, ffn_dim=13824, num_layers=40,
        ),
        "wan2.1-i2v-14b": dict(
            num_attention_heads=40, attention_head_dim=128, in_channels=36, text_dim=4096, ffn_dim=13824,
            num_layers=40, image_dim=1280, added_kv_proj_dim=5120,
        ),
        # Wan2.2: TI2V-5B (48-channel latents of the Wan2.2 VAE; per-token timesteps are a call-time input) and
        # the two experts of each A14B model (transformer / transformer_2 share one config). The I2V A14B
        # experts take the 36-channel I2V input but have no CLIP image branch.
        "wan2.2-ti2v-5b": dict(
            num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48, text_dim=4096,
            ffn_dim=14336, num_layers=30,
        ),
        "wan2.2-t2v-a14b": dict(
            num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
            ffn_dim=13824, num_layers=40,
        ),
        "wan2.2-i2v-a14b": dict(
            num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16, text_dim=4096,
            ffn_dim=13824, num_layers=40,
        ),
    }
)


def wan_preset(name: str) -> WanVideoArchConfig:
    """The ArchConfig of a preset by name; an unknown name lists the presets."""
    if name not in WAN_PRESETS:
        raise KeyError(f"unknown Wan preset {name!r}; presets: {sorted(WAN_PRESETS)}")
    return WanVideoArchConfig().update_model_arch(WAN_PRESETS[name])
