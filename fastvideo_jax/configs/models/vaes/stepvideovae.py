"""StepVideo VAE (``AutoencoderKLStepvideo``, StepFun's "vae_v2") configuration: checkpoint fields and presets.

Facts (verified against diffsynth 1.1.9's ``stepvideo_vae.py``, StepFun's code, and FastVideo 0.1.7's
``StepVideoVAEArchConfig``): 64 latent channels; 16x16 spatial and 8x temporal compression (three 2x spatial
stages, two of them also 2x in time, then a 2x2x2 pixel-unshuffle); the video is encoded in chunks of
``frame_len = 17`` frames and decoded in chunks of 3 latent frames (17 frames each); scaling factor 1.0 and no
shift. The channel widths (encoder ``ch=32, ch_mult=(4, 8, 16, 16)``, decoder ``ch=128, ch_mult=(1, 2, 4, 4)``)
and the 32-group GroupNorms are fixed in the original code, not in its config.json; they are fields here so that a
tiny preset can shrink them.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from fastvideo_jax.configs.models.base import NameMapping, derived, internal
from fastvideo_jax.configs.models.vaes.base import VAEArchConfig, VAEConfig

# StepFun's checkpoint (and FastVideo's ``vae/`` folder) names the decoder's last conv ``decoder.conv_out.*``;
# the module (ours and the original's) nests it one level down, as every other causal conv.
STEPVIDEO_VAE_PARAM_NAMES_MAPPING: NameMapping = ((r"^decoder\.conv_out\.(weight|bias)$", r"decoder.conv_out.conv.\1"),)
STEPVIDEO_VAE_REVERSE_PARAM_NAMES_MAPPING: NameMapping = (
    (r"^decoder\.conv_out\.conv\.(weight|bias)$", r"decoder.conv_out.\1"),
)
NORM_GROUPS = 32  # every GroupNorm of the original (hard-coded there)
LEVELS = 4  # the original's resolutions: its temporal stages ([1, 2] down, [2, 3] up) assume exactly four


@dataclasses.dataclass(frozen=True)
class StepVideoVAEArchConfig(VAEArchConfig):
    """``AutoencoderKLStepvideo`` config.json fields (FastVideo's names), plus the original's fixed widths."""

    in_channels: int = 3
    out_channels: int = 3
    z_channels: int = 64
    num_res_blocks: int = 2
    version: int = 2
    frame_len: int = 17
    world_size: int = 1  # FastVideo's field (frames split over ranks); accepted and unused: our mesh does that
    spatial_compression_ratio: int = 16
    temporal_compression_ratio: int = 8
    scaling_factor: float = 1.0
    encoder_ch: int = 32
    encoder_ch_mult: tuple[int, ...] = (4, 8, 16, 16)
    decoder_ch: int = 128
    decoder_ch_mult: tuple[int, ...] = (1, 2, 4, 4)

    param_names_mapping: NameMapping = internal(STEPVIDEO_VAE_PARAM_NAMES_MAPPING)
    reverse_param_names_mapping: NameMapping = internal(STEPVIDEO_VAE_REVERSE_PARAM_NAMES_MAPPING)

    # Derived: latent frames of one ``frame_len`` chunk (3), and the 2x2x2 pixel-(un)shuffle width (32 z).
    latent_len: int = derived(0)
    patch_channels: int = derived(0)

    def __post_init__(self) -> None:
        where = "StepVideoVAEArchConfig"
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.version != 2:
            raise ValueError(f"{where}: version={self.version}; only StepVideo's vae_v2 (version 2) is supported")
        if len(self.encoder_ch_mult) != LEVELS or len(self.decoder_ch_mult) != LEVELS:
            raise ValueError(f"{where}: encoder_ch_mult {self.encoder_ch_mult} / decoder_ch_mult "
                             f"{self.decoder_ch_mult} must have {LEVELS} levels (the original's temporal stages)")
        if (self.spatial_compression_ratio, self.temporal_compression_ratio) != (16, 8):
            raise ValueError(f"{where}: the architecture compresses 16x in space and 8x in time; the config says "
                             f"{self.spatial_compression_ratio}/{self.temporal_compression_ratio}")
        if self.frame_len < 1 or (self.frame_len - 1) % self.temporal_compression_ratio:
            raise ValueError(f"{where}: frame_len={self.frame_len} must be 1 + 8k (17 in the release)")
        patch = 4 * self.z_channels * 8
        widths = [self.encoder_ch * m for m in (1, *self.encoder_ch_mult)]
        widths += [self.decoder_ch * m for m in self.decoder_ch_mult]
        bad = sorted({w for w in widths if w % NORM_GROUPS})
        if bad:
            raise ValueError(f"{where}: channel widths {bad} are not multiples of the {NORM_GROUPS} norm groups")
        for side, width in (("encoder", widths[LEVELS]), ("decoder", self.decoder_ch * self.decoder_ch_mult[-1])):
            if (8 * width) % patch:
                raise ValueError(f"{where}: the {side}'s last width {width} times 8 must be a multiple of the "
                                 f"pixel-shuffle width 32 * z_channels = {patch} (its channel-averaging shortcut)")
        object.__setattr__(self, "latent_len", (self.frame_len - 1) // self.temporal_compression_ratio + 1)
        object.__setattr__(self, "patch_channels", patch)

    @property
    def z_dim(self) -> int:
        """Latent channels under the Wan VAE's name, for stages that read ``vae_arch.z_dim``."""
        return self.z_channels


@dataclasses.dataclass(frozen=True)
class StepVideoVAEConfig(VAEConfig):
    """Our knobs. ``smooth_scale`` is the original's blend of the two frames at each 17-frame chunk boundary
    (each keeps 0.6 of itself and takes 0.4 of its neighbour). ``attention_block`` bounds the mid-block's causal
    attention to (block, L) scores per step. ``use_tiling`` (off by default, as in FastVideo and diffsynth)
    decodes each chunk in DiffSynth's spatial tiles: ``tile_sample_min_*`` pixels every ``tile_sample_stride_*``
    (its defaults, 34 and 16 latents), blended by linear masks; encoding is never tiled."""

    arch_config: StepVideoVAEArchConfig = dataclasses.field(default_factory=StepVideoVAEArchConfig)
    prefix: str = "StepVideo"
    smooth_scale: float = 0.6
    attention_block: int = 1024
    tile_sample_min_height: int = 544
    tile_sample_min_width: int = 544
    tile_sample_stride_height: int = 256
    tile_sample_stride_width: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.arch_config.spatial_compression_ratio
        for name in ("height", "width"):
            size, stride = getattr(self, f"tile_sample_min_{name}"), getattr(self, f"tile_sample_stride_{name}")
            if not 0 < stride < size or size % r or stride % r:
                raise ValueError(f"StepVideoVAEConfig: tile_sample_min_{name}={size} and tile_sample_stride_{name}="
                                 f"{stride} must be positive multiples of {r} with the stride below the tile")
        if not 0.0 <= self.smooth_scale <= 1.0:
            raise ValueError(f"StepVideoVAEConfig: smooth_scale={self.smooth_scale} must be in [0, 1]")
        if self.attention_block < 1:
            raise ValueError(f"StepVideoVAEConfig: attention_block={self.attention_block} must be positive")
        a = self.arch_config
        skipped = (() if self.load_encoder else (r"^encoder\.",)) + (() if self.load_decoder else (r"^decoder\.",))
        if skipped != a.ignored_param_patterns:
            object.__setattr__(self, "arch_config", dataclasses.replace(a, ignored_param_patterns=skipped))


# Presets as data: config.json contents. ``tiny`` keeps every structural feature (4 levels, 2 res blocks, a width
# change with a 1x1 shortcut on each side, 64-channel GroupNorm groups of 2) at 32-64 channels and 4 latents.
STEPVIDEO_VAE_PRESETS = MappingProxyType(
    {
        "tiny": dict(z_channels=4, encoder_ch=32, encoder_ch_mult=(1, 2, 2, 2), decoder_ch=32,
                     decoder_ch_mult=(1, 1, 2, 2)),
        # FastVideo/stepvideo-t2v-diffusers vae (FastVideo's StepVideoVAEArchConfig, the original's widths).
        "stepvideo": dict(in_channels=3, out_channels=3, z_channels=64, num_res_blocks=2, version=2, frame_len=17,
                          spatial_compression_ratio=16, temporal_compression_ratio=8, scaling_factor=1.0),
    }
)


def stepvideo_vae_preset(name: str) -> StepVideoVAEArchConfig:
    """The ArchConfig of a preset by name; an unknown name lists the presets."""
    if name not in STEPVIDEO_VAE_PRESETS:
        raise KeyError(f"unknown StepVideo VAE preset {name!r}; presets: {sorted(STEPVIDEO_VAE_PRESETS)}")
    return StepVideoVAEArchConfig().update_model_arch(STEPVIDEO_VAE_PRESETS[name])
