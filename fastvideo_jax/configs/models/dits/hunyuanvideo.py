"""HunyuanVideo DiT (``HunyuanVideoTransformer3DModel``, diffusers layout): checkpoint fields, name mappings,
presets."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from fastvideo_jax.configs.models.base import derived, internal
from fastvideo_jax.configs.models.dits.base import DiTArchConfig, NameMapping, SlidingTileDiTConfig

_ANY = r"^(.*)"

# Diffusers name -> our module name (first match wins; unmatched names map to themselves). Our modules carry the
# checkpoint's names; only PyTorch's Sequential indices (``to_out.0``, ``ff.net.0.proj``, ``ff.net.2``) differ.
HUNYUAN_PARAM_NAMES_MAPPING: NameMapping = (
    (_ANY + r"\.to_out\.0\.(.*)$", r"\1.to_out.\2"),
    (_ANY + r"\.(ff|ff_context)\.net\.0\.proj\.(.*)$", r"\1.\2.fc_in.\3"),
    (_ANY + r"\.(ff|ff_context)\.net\.2\.(.*)$", r"\1.\2.fc_out.\3"),
)

# Our module name -> diffusers name, for export.
HUNYUAN_REVERSE_PARAM_NAMES_MAPPING: NameMapping = (
    (_ANY + r"\.to_out\.(weight|bias)$", r"\1.to_out.0.\2"),
    (_ANY + r"\.(ff|ff_context)\.fc_in\.(.*)$", r"\1.\2.net.0.proj.\3"),
    (_ANY + r"\.(ff|ff_context)\.fc_out\.(.*)$", r"\1.\2.net.2.\3"),
)

REFINER_BLOCKS = "context_embedder.token_refiner.refiner_blocks"


@dataclasses.dataclass(frozen=True)
class HunyuanVideoArchConfig(DiTArchConfig):
    """``HunyuanVideoTransformer3DModel`` config.json fields; defaults are the released 13B model's."""

    in_channels: int = 16
    out_channels: int = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20  # dual-stream blocks
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True
    text_embed_dim: int = 4096
    pooled_projection_dim: int = 768
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)
    image_condition_type: str | None = None

    param_names_mapping: NameMapping = internal(HUNYUAN_PARAM_NAMES_MAPPING)
    reverse_param_names_mapping: NameMapping = internal(HUNYUAN_REVERSE_PARAM_NAMES_MAPPING)
    scanned_prefixes: tuple[str, ...] = internal(("transformer_blocks", "single_transformer_blocks", REFINER_BLOCKS))
    # LoRA targets: the blocks' attention (video and text streams) and MLP projections, in our module names; the
    # embedders (FastVideo excludes img_in / txt_in / time_in / vector_in) get none.
    lora_target_modules: tuple[str, ...] = internal((
        "to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.fc_in",
        "ff.fc_out", "ff_context.fc_in", "ff_context.fc_out", "proj_mlp", "single_transformer_blocks.proj_out"))
    exclude_lora_layers: tuple[str, ...] = internal(("context_embedder", "time_text_embed", "x_embedder"))

    hidden_size: int = derived(0)
    num_channels_latents: int = derived(0)
    mlp_dim: int = derived(0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rope_axes_dim", tuple(self.rope_axes_dim))
        object.__setattr__(self, "out_channels", self.out_channels or self.in_channels)
        object.__setattr__(self, "hidden_size", self.num_attention_heads * self.attention_head_dim)
        object.__setattr__(self, "num_channels_latents", self.out_channels)
        object.__setattr__(self, "mlp_dim", int(self.hidden_size * self.mlp_ratio))
        name = "HunyuanVideoArchConfig"
        if self.qk_norm != "rms_norm":
            raise ValueError(f"{name}: qk_norm={self.qk_norm!r} is not supported (rms_norm)")
        if self.image_condition_type is not None:
            raise ValueError(f"{name}: image_condition_type={self.image_condition_type!r} (HunyuanVideo-I2V) is not "
                             "supported; only the text-to-video model (None)")
        if len(self.rope_axes_dim) != 3 or sum(self.rope_axes_dim) != self.attention_head_dim or any(
                d % 2 for d in self.rope_axes_dim):
            raise ValueError(f"{name}: rope_axes_dim {self.rope_axes_dim} must be 3 even sizes summing to "
                             f"attention_head_dim={self.attention_head_dim}")


@dataclasses.dataclass(frozen=True)
class HunyuanVideoConfig(SlidingTileDiTConfig):
    """HunyuanVideo DiT knobs; sliding-tile attention fields: see ``SlidingTileDiTConfig``. Its layers are the
    dual-stream blocks then the single-stream blocks (``num_layers + num_single_layers`` windows, FastVideo's
    layer numbering); each attends [video; text] with the sliding tile on the video and the real text tokens
    joined in full."""

    arch_config: HunyuanVideoArchConfig = dataclasses.field(default_factory=HunyuanVideoArchConfig)
    prefix: str = "Hunyuan"


# Presets as data: config.json contents. ``tiny`` builds in milliseconds.
HUNYUAN_PRESETS = MappingProxyType({
    "tiny": dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_single_layers=2, num_refiner_layers=2, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        text_embed_dim=16, pooled_projection_dim=12, rope_theta=256.0, rope_axes_dim=(2, 2, 4),
        guidance_embeds=True,
    ),
    # hunyuanvideo-community/HunyuanVideo transformer/config.json (FastHunyuan shares the shape)
    "hunyuanvideo": dict(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
        num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
        rope_theta=256.0, rope_axes_dim=(16, 56, 56),
    ),
})


def hunyuan_preset(name: str) -> HunyuanVideoArchConfig:
    """The ArchConfig of a preset by name; an unknown name lists the presets."""
    if name not in HUNYUAN_PRESETS:
        raise KeyError(f"unknown HunyuanVideo preset {name!r}; presets: {sorted(HUNYUAN_PRESETS)}")
    return HunyuanVideoArchConfig().update_model_arch(HUNYUAN_PRESETS[name])
