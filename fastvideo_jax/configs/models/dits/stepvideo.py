"""StepVideo-T2V DiT (``StepVideoModel``): checkpoint fields, name mappings, presets.

Facts, read from the PyTorch oracles (DiffSynth 1.1.9 ``diffsynth/models/stepvideo_dit.py``, FastVideo 0.1.7
``fastvideo/models/dits/stepvideo.py`` and ``fastvideo/configs/models/dits/stepvideo.py``):

- The checkpoint (``stepfun-ai/stepvideo-t2v`` and FastVideo's ``FastVideo/stepvideo-t2v-diffusers``, whose
  ``transformer/config.json`` names ``_class_name: StepVideoModel``) uses the original module names; FastVideo's
  ``param_names_mapping`` maps exactly those names (``transformer_blocks.N.ff.net.0.proj.weight``,
  ``adaln_single.emb.timestep_embedder.linear_1.*``, ``caption_projection.linear_1.*``, ...) onto its own
  modules. Our modules carry the checkpoint's names, so only PyTorch's ``ff.net.0.proj`` / ``ff.net.2`` differ.
  FastVideo's internal names (a checkpoint saved from FastVideo's modules) map too: one table away.
- The 3D RoPE split of a head is hard-coded ``(64, 32, 32)`` (frames, rows, columns) for the released head dim
  128; for other head dims we use the same proportions ``(E/2, E/4, E/4)``.
- The block LayerNorms are affine with eps 1e-5 (the block's default; ``norm_eps`` does not reach them); the
  caption norm and the output norm use ``norm_eps`` and ``norm_elementwise_affine``; the q/k RMSNorms eps 1e-6.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from fastvideo_jax.configs.models.base import derived, internal
from fastvideo_jax.configs.models.dits.base import DiTArchConfig, DiTConfig, NameMapping

_B = r"^transformer_blocks\.(\d+)\."

# Checkpoint name -> our module name (first match wins; unmatched names map to themselves).
STEPVIDEO_PARAM_NAMES_MAPPING: NameMapping = (
    (_B + r"ff\.net\.0\.proj\.(.*)$", r"transformer_blocks.\1.ff.fc_in.\2"),
    (_B + r"ff\.net\.2\.(.*)$", r"transformer_blocks.\1.ff.fc_out.\2"),
    # FastVideo's module names (what its param_names_mapping produces), should a checkpoint carry them
    (_B + r"(norm1|norm2)\.norm\.(.*)$", r"transformer_blocks.\1.\2.\3"),
    (r"^adaln_single\.emb\.mlp\.fc_in\.(.*)$", r"adaln_single.emb.timestep_embedder.linear_1.\1"),
    (r"^adaln_single\.emb\.mlp\.fc_out\.(.*)$", r"adaln_single.emb.timestep_embedder.linear_2.\1"),
    (r"^caption_projection\.fc_in\.(.*)$", r"caption_projection.linear_1.\1"),
    (r"^caption_projection\.fc_out\.(.*)$", r"caption_projection.linear_2.\1"),
)

# Our module name -> checkpoint name (export, ``fastvideo-jax convert``).
STEPVIDEO_REVERSE_PARAM_NAMES_MAPPING: NameMapping = (
    (_B + r"ff\.fc_in\.(.*)$", r"transformer_blocks.\1.ff.net.0.proj.\2"),
    (_B + r"ff\.fc_out\.(.*)$", r"transformer_blocks.\1.ff.net.2.\2"),
)


@dataclasses.dataclass(frozen=True)
class StepVideoArchConfig(DiTArchConfig):
    """``StepVideoModel`` config.json fields; defaults are the released 30B model's."""

    num_attention_heads: int = 48
    attention_head_dim: int = 128
    in_channels: int = 64
    out_channels: int | None = 64
    num_layers: int = 48
    dropout: float = 0.0  # inference: unused
    patch_size: int = 1
    norm_type: str = "ada_norm_single"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    use_additional_conditions: bool = False
    # [Step-LLM hidden size, CLIP (BERT) hidden size], or one int: no CLIP projection
    caption_channels: int | tuple[int, ...] = (6144, 1024)
    attention_type: str | None = "torch"  # the original's kernel choice: our backend is attention_backend

    param_names_mapping: NameMapping = internal(STEPVIDEO_PARAM_NAMES_MAPPING)
    reverse_param_names_mapping: NameMapping = internal(STEPVIDEO_REVERSE_PARAM_NAMES_MAPPING)
    scanned_prefixes: tuple[str, ...] = internal(("transformer_blocks",))

    hidden_size: int = derived(0)
    num_channels_latents: int = derived(0)
    caption_dim: int = derived(0)  # Step-LLM states' width
    clip_dim: int | None = derived(None)  # CLIP (BERT) states' width; None: the model has no clip_projection
    rope_axes_dim: tuple[int, int, int] = derived((64, 32, 32))
    ff_dim: int = derived(0)

    def __post_init__(self) -> None:
        name, E = "StepVideoArchConfig", self.attention_head_dim
        out = self.in_channels if self.out_channels is None else self.out_channels
        object.__setattr__(self, "out_channels", out)
        object.__setattr__(self, "hidden_size", self.num_attention_heads * E)
        object.__setattr__(self, "num_channels_latents", out)
        object.__setattr__(self, "ff_dim", 4 * self.hidden_size)  # FeedForward(mult=4), no inner dim in config
        channels = self.caption_channels
        if isinstance(channels, int):
            caption, clip = channels, None
        elif len(channels) == 2:
            caption, clip = (int(c) for c in channels)
        else:
            raise ValueError(f"{name}: caption_channels {channels!r} must be an int or [llm_dim, clip_dim]")
        object.__setattr__(self, "caption_dim", caption)
        object.__setattr__(self, "clip_dim", clip)
        if E % 8:
            raise ValueError(f"{name}: attention_head_dim={E} must be a multiple of 8 (3D RoPE split E/2, E/4, E/4)")
        object.__setattr__(self, "rope_axes_dim", (E // 2, E // 4, E // 4))
        if self.norm_type != "ada_norm_single":
            raise ValueError(f"{name}: norm_type={self.norm_type!r} is not supported (ada_norm_single)")
        if self.use_additional_conditions:
            raise ValueError(f"{name}: use_additional_conditions=true (resolution / frame-count / fps embeddings) is "
                             "not supported; the released StepVideo checkpoints set it false")


@dataclasses.dataclass(frozen=True)
class StepVideoConfig(DiTConfig):
    """StepVideo DiT knobs (precision, attention backend); architecture in ``StepVideoArchConfig``."""

    arch_config: StepVideoArchConfig = dataclasses.field(default_factory=StepVideoArchConfig)
    prefix: str = "StepVideo"


# Presets as data: config.json contents. ``tiny`` keeps the released head dim (the original's RoPE split is
# hard-coded for 128) and builds in well under a second.
STEPVIDEO_PRESETS = MappingProxyType({
    "tiny": dict(
        num_attention_heads=2, attention_head_dim=128, in_channels=8, out_channels=8, num_layers=2, patch_size=1,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
        caption_channels=(48, 24), attention_type="torch",
    ),
    # stepfun-ai/stepvideo-t2v (and -turbo) transformer/config.json; FastVideo/stepvideo-t2v-diffusers
    "stepvideo-t2v": dict(
        num_attention_heads=48, attention_head_dim=128, in_channels=64, out_channels=64, num_layers=48,
        patch_size=1, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False, caption_channels=(6144, 1024), attention_type="torch",
    ),
})


def stepvideo_preset(name: str) -> StepVideoArchConfig:
    """The ArchConfig of a preset by name; an unknown name lists the presets."""
    if name not in STEPVIDEO_PRESETS:
        raise KeyError(f"unknown StepVideo DiT preset {name!r}; presets: {sorted(STEPVIDEO_PRESETS)}")
    return StepVideoArchConfig().update_model_arch(STEPVIDEO_PRESETS[name])
