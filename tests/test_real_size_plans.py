"""Real-size architectures map completely: the PyTorch classes' parameter names and shapes at the real
configs (built on the meta device, no memory) convert onto our abstract models with no unknown, missing or
mis-shaped tensor, and in the same total size."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from converters import NameMapper, build_plan
from fastvideo_jax.models.loader.component_loader import build_abstract, leaf_specs


def _plan(torch_model, model_cls, arch: dict, **overrides):
    shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    config = model_cls.config_class().update_model_arch(arch).update_model_config(**overrides)
    _, abstract = build_abstract(model_cls, config)
    specs = leaf_specs(abstract)
    a = config.arch_config
    plan = build_plan(shapes, specs, NameMapper(a.param_names_mapping), a.scanned_prefixes, a.ignored_param_patterns,
                      tied_names=a.tied_param_names)
    ours = sum(math.prod(s.shape) for s in specs.values())
    theirs = sum(math.prod(s) for k, s in shapes.items() if k not in plan.ignored)
    assert ours == theirs, f"{model_cls.__name__}: {ours} parameters vs {theirs} in the checkpoint"
    return ours, specs


# Parameter counts of diffusers' WanTransformer3DModel at the released configs (per expert for A14B): a preset
# that drifts from the checkpoint's shape fails here even though both sides would still agree with each other.
_WAN_DIT_SIZES = {
    "wan2.1-t2v-1.3b": 1_418_996_800,
    "wan2.1-t2v-14b": 14_288_491_584,
    "wan2.1-i2v-14b": 16_394_878_784,
    "wan2.2-ti2v-5b": 4_999_787_712,
    "wan2.2-t2v-a14b": 14_288_491_584,
    "wan2.2-i2v-a14b": 14_288_901_184,
}


@pytest.mark.parametrize("preset", sorted(_WAN_DIT_SIZES))
def test_wan_dit_real_sizes(preset):
    from diffusers import WanTransformer3DModel

    from fastvideo_jax.configs.models.dits.wanvideo import WAN_PRESETS
    from fastvideo_jax.models.dits.wanvideo import WanTransformer3DModel as Ours

    with torch.device("meta"):
        ref = WanTransformer3DModel(**WAN_PRESETS[preset])
    assert sum(p.numel() for p in ref.parameters()) == _WAN_DIT_SIZES[preset]
    n, specs = _plan(ref, Ours, WAN_PRESETS[preset], precision="bf16")  # every tensor mapped, same total
    assert n > 1e9
    arch = Ours.config_class().update_model_arch(WAN_PRESETS[preset]).arch_config
    assert specs[("patch_embedding", "proj", "kernel")].shape == (1, 2, 2, arch.in_channels, arch.hidden_size)
    assert specs[("proj_out", "kernel")].shape == (arch.hidden_size, 4 * arch.out_channels)


def test_hunyuan_video_dit_real_size():
    """HunyuanVideo's 13B DiT (hunyuanvideo-community/HunyuanVideo transformer/config.json): 20 dual-stream +
    40 single-stream blocks and the 2-block token refiner, every tensor mapped onto the three stacked scans."""
    from diffusers import HunyuanVideoTransformer3DModel

    from fastvideo_jax.configs.models.dits.hunyuanvideo import HUNYUAN_PRESETS
    from fastvideo_jax.models.dits.hunyuanvideo import HunyuanVideoTransformer3DModel as Ours

    arch = HUNYUAN_PRESETS["hunyuanvideo"]
    with torch.device("meta"):
        ref = HunyuanVideoTransformer3DModel(**arch)
    assert sum(p.numel() for p in ref.parameters()) == 12_821_012_544
    n, specs = _plan(ref, Ours, arch, precision="bf16")
    assert n == 12_821_012_544
    assert specs[("x_embedder", "proj", "kernel")].shape == (1, 2, 2, 16, 3072)
    assert specs[("transformer_blocks", "attn", "to_q", "kernel")].shape == (20, 3072, 3072)
    assert specs[("single_transformer_blocks", "proj_out", "kernel")].shape == (40, 3072 + 12288, 3072)
    assert specs[("context_embedder", "token_refiner", "refiner_blocks", "ff", "fc_in", "kernel")].shape == (
        2, 3072, 12288)


def test_wan_vae_real_size():
    from diffusers import AutoencoderKLWan

    from fastvideo_jax.configs.models.vaes.wanvae import WAN_VAE_PRESETS
    from fastvideo_jax.models.vaes.wanvae import AutoencoderKLWan as Ours

    arch = WAN_VAE_PRESETS["wan2.1"]
    with torch.device("meta"):
        ref = AutoencoderKLWan(**{k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()})
    _plan(ref, Ours, arch)


# Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json (hub metadata and the 48 latent statistics left out; the
# statistics are checked in tests/test_wan22_vae.py).
WAN22_VAE_CONFIG_JSON = {
    "_class_name": "AutoencoderKLWan", "attn_scales": [], "base_dim": 160, "decoder_base_dim": 256,
    "dim_mult": [1, 2, 4, 4], "dropout": 0.0, "in_channels": 12, "is_residual": True, "num_res_blocks": 2,
    "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16, "scale_factor_temporal": 4,
    "temperal_downsample": [False, True, True], "z_dim": 48,
}


def test_wan22_vae_real_size():
    from diffusers import AutoencoderKLWan

    from fastvideo_jax.configs.models.vaes.wanvae import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, WAN_VAE_PRESETS
    from fastvideo_jax.models.vaes.wanvae import AutoencoderKLWan as Ours

    raw = {**WAN22_VAE_CONFIG_JSON, "latents_mean": list(WAN22_LATENTS_MEAN), "latents_std": list(WAN22_LATENTS_STD)}
    preset = Ours.config_class().update_model_arch(WAN_VAE_PRESETS["wan2.2"]).arch_config
    assert Ours.config_class().update_model_arch(raw).arch_config == preset, "the wan2.2 preset is the config.json"
    with torch.device("meta"):
        ref = AutoencoderKLWan(**{k: v for k, v in raw.items() if not k.startswith("_")})
    n, specs = _plan(ref, Ours, raw)  # every tensor mapped, same total
    assert n == 704_688_668  # 2.82 GB in fp32, the size of the released Wan2.2_VAE.pth
    # The residual decoder keeps its width through the upsamplers (Wan2.1 halves it): 1024 in and out.
    assert specs[("decoder", "up_blocks", 0, "upsampler", "resample_conv", "kernel")].shape == (3, 3, 1024, 1024)
    assert specs[("encoder", "conv_in", "kernel")].shape == (3, 3, 3, 12, 160)  # 2x2-patchified RGB in
    assert specs[("decoder", "conv_out", "kernel")].shape == (3, 3, 3, 256, 12)


def test_umt5_xxl_real_size():
    from transformers import UMT5Config, UMT5EncoderModel

    from fastvideo_jax.configs.models.encoders.t5 import T5_PRESETS
    from fastvideo_jax.models.encoders.t5 import UMT5EncoderModel as Ours

    arch = dict(T5_PRESETS["umt5-xxl"])
    with torch.device("meta"):
        ref = UMT5EncoderModel(UMT5Config(**arch))
    n, specs = _plan(ref, Ours, arch)
    assert n == 5_680_910_336
    dtypes = {spec.dtype for spec in specs.values()}
    assert dtypes == {np.dtype("float32")}, f"UMT5-XXL parameters default to fp32 (as Wan runs it), got {dtypes}"


def test_clip_vit_h14_vision_real_size():
    """Wan2.1 I2V's image_encoder: open-clip ViT-H/14 as CLIPVisionModelWithProjection."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from fastvideo_jax.configs.models.encoders.clip import CLIP_VISION_PRESETS
    from fastvideo_jax.models.encoders.clip import CLIPVisionModelWithProjection as Ours

    arch = dict(CLIP_VISION_PRESETS["vit-h-14"])
    with torch.device("meta"):
        ref = CLIPVisionModelWithProjection(CLIPVisionConfig(**arch))
    n, _ = _plan(ref, Ours, arch)
    assert n == 632_076_800, n


def test_clip_vit_large_text_real_size():
    """HunyuanVideo's text_encoder_2: openai/clip-vit-large-patch14's text tower as CLIPTextModel."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from fastvideo_jax.configs.models.encoders.clip import CLIP_TEXT_PRESETS
    from fastvideo_jax.models.encoders.clip import CLIPTextModel as Ours

    arch = dict(CLIP_TEXT_PRESETS["clip-vit-large-patch14"])
    with torch.device("meta"):
        ref = CLIPTextModel(CLIPTextConfig(**arch))
    n, _ = _plan(ref, Ours, arch)
    assert n == 123_060_480, n


def test_llava_llama3_8b_text_encoder_real_size():
    """HunyuanVideo's text_encoder: the llava-llama-3-8b text tower as LlamaModel (fp16 as shipped), GQA 32/8."""
    from transformers import LlamaConfig, LlamaModel

    from fastvideo_jax.configs.models.encoders.llama import LLAMA_PRESETS
    from fastvideo_jax.models.encoders.llama import LlamaModel as Ours

    arch = dict(LLAMA_PRESETS["llava-llama-3-8b"])
    with torch.device("meta"):
        ref = LlamaModel(LlamaConfig(**arch))
    n, specs = _plan(ref, Ours, arch)
    assert n == 7_505_186_816, n  # 128320 x 4096 embeddings + 32 x 218_112_000 per layer + the final norm
    assert {spec.dtype for spec in specs.values()} == {np.dtype("float16")}, "default precision is the shipped fp16"
    assert specs[("layers", "self_attn", "k_proj", "kernel")].shape == (32, 4096, 8 * 128)
    assert specs[("layers", "self_attn", "q_proj", "kernel")].shape == (32, 4096, 32 * 128)


# hunyuanvideo-community/HunyuanVideo vae/config.json (hub metadata left out).
HUNYUAN_VAE_CONFIG_JSON = {
    "_class_name": "AutoencoderKLHunyuanVideo", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["HunyuanVideoDownBlock3D"] * 4, "in_channels": 3, "latent_channels": 16,
    "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3,
    "scaling_factor": 0.476986, "spatial_compression_ratio": 8, "temporal_compression_ratio": 4,
    "up_block_types": ["HunyuanVideoUpBlock3D"] * 4,
}


def test_hunyuan_vae_real_size():
    from diffusers import AutoencoderKLHunyuanVideo

    from fastvideo_jax.configs.models.vaes.hunyuanvae import HUNYUAN_VAE_PRESETS
    from fastvideo_jax.models.vaes.hunyuanvae import AutoencoderKLHunyuanVideo as Ours

    raw = HUNYUAN_VAE_CONFIG_JSON
    preset = Ours.config_class().update_model_arch(HUNYUAN_VAE_PRESETS["hunyuanvideo"]).arch_config
    assert Ours.config_class().update_model_arch(raw).arch_config == preset, "the preset is the config.json"
    with torch.device("meta"):
        ref = AutoencoderKLHunyuanVideo(**{k: v for k, v in raw.items() if not k.startswith("_")})
    n, specs = _plan(ref, Ours, raw)  # every tensor mapped, same total
    assert n == 246_478_803
    # Time x2 in the encoder's 2nd and 3rd stages (and the decoder's), space x2 in the first three.
    assert preset.strides == ((1, 2), (2, 2), (2, 2), (1, 1))
    assert specs[("encoder", "down_blocks", 1, "downsamplers", 0, "conv", "conv", "kernel")].shape == (3, 3, 3, 256, 256)
    assert specs[("decoder", "mid_block", "attentions", 0, "to_q", "kernel")].shape == (512, 512)
    assert ("decoder", "up_blocks", 3, "upsamplers", 0, "conv", "conv", "kernel") not in specs


def test_stepvideo_vae_real_size():
    """StepVideo's VAE (StepFun's vae_v2, FastVideo/stepvideo-t2v-diffusers' vae): the original's modules at the
    release's widths (diffsynth's StepVideoVAE, version 2, z = 64) under the checkpoint's names (its
    ``decoder.conv_out.*``), every tensor mapped, same total."""
    from fastvideo_jax.configs.models.vaes.stepvideovae import STEPVIDEO_VAE_PRESETS
    from fastvideo_jax.models.vaes.stepvideovae import AutoencoderKLStepvideo as Ours
    from tests.stepvideo_oracle import diffsynth_module

    raw = {"_class_name": "AutoencoderKLStepvideo", **STEPVIDEO_VAE_PRESETS["stepvideo"]}
    with torch.device("meta"):
        ref = diffsynth_module("stepvideo_vae").StepVideoVAE(z_channels=64, version=2)
    release = {k.replace("decoder.conv_out.conv.", "decoder.conv_out."): v for k, v in ref.state_dict().items()}
    assert "decoder.conv_out.weight" in release and "decoder.conv_out.conv.weight" not in release
    holder = type("Release", (), {"state_dict": lambda self: release})()
    n, specs = _plan(holder, Ours, raw)  # every tensor mapped, same total
    assert n == sum(p.numel() for p in ref.parameters()) == 498_818_819  # 1.0 GB in bf16
    assert specs[("decoder", "conv_in", "conv", "kernel")].shape == (3, 3, 3, 64, 2048)
    assert specs[("decoder", "conv_unpatchify", "conv", "conv", "kernel")].shape == (3, 3, 3, 2048, 4096)
    assert specs[("encoder", "conv_out", "conv", "kernel")].shape == (3, 3, 3, 2048, 128)
    assert specs[("decoder", "up", 1, "upsample", "conv", "kernel")].shape == (3, 3, 256, 256)
    assert specs[("encoder", "down", 0, "downsample", "conv", "kernel")].shape == (3, 3, 128, 128)
    assert specs[("decoder", "up", 3, "upsample", "conv3d", "conv1", "conv", "kernel")].shape == (3, 3, 3, 512, 512)
