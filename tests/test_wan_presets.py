"""Wan family presets: every public checkpoint id has a PipelineConfig + SamplingParam with FastVideo's values,
each valid for its model's geometry, found by id and (where the content is unambiguous) by content; the
Wan2.2 / FastWan fields are validated with errors naming the field."""

from __future__ import annotations

import math

import pytest

from fastvideo_jax.configs.models.dits.wanvideo import WAN_PRESETS
from fastvideo_jax.configs.pipelines.base import PipelineConfig
from fastvideo_jax.configs.pipelines.registry import find_model_defaults, get_model_defaults
from fastvideo_jax.configs.pipelines.wan import FastWan21T2V480PConfig, WanT2V480PConfig
from fastvideo_jax.configs.sample import WAN_NEGATIVE_PROMPT, WAN_NEGATIVE_PROMPT_ZH, SamplingParam
from fastvideo_jax.errors import UserError

# id -> (height, width, frames, fps, steps, guidance, guidance_2, flow_shift, boundary, expand, dmd, negative)
_ZH, _EN = WAN_NEGATIVE_PROMPT_ZH, WAN_NEGATIVE_PROMPT
_DMD = (1000, 757, 522)
EXPECTED = {
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers": (480, 832, 81, 16, 40, 5.0, None, 3.0, None, False, None, _EN),
    "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers": (720, 1280, 81, 16, 40, 5.0, None, 5.0, None, False, None, _EN),
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": (704, 1280, 121, 24, 50, 5.0, None, 5.0, None, True, None, _ZH),
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": (720, 1280, 81, 16, 40, 4.0, 3.0, 12.0, 0.875, False, None, _ZH),
    "Wan-AI/Wan2.2-I2V-A14B-Diffusers": (720, 1280, 81, 16, 40, 3.5, 3.5, 5.0, 0.9, False, None, _ZH),
    "FastVideo/FastWan2.1-T2V-1.3B-Diffusers": (448, 832, 61, 16, 3, 1.0, None, 8.0, None, False, _DMD, _EN),
    "FastVideo/FastWan2.1-T2V-14B-480P-Diffusers": (448, 832, 61, 16, 3, 1.0, None, 8.0, None, False, _DMD, _EN),
    "FastVideo/FastWan2.2-TI2V-5B-Diffusers": (704, 1280, 121, 24, 3, 1.0, None, 8.0, None, True, _DMD, _ZH),
    "FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers": (704, 1280, 121, 24, 3, 1.0, None, 8.0, None, True, _DMD,
                                                        _ZH),
}
# VAE (spatial, temporal) compression of each id's latents: Wan2.2-TI2V uses the 16x Wan2.2 VAE.
_VAE = {True: (16, 4), False: (8, 4)}


@pytest.mark.parametrize("model_id", sorted(EXPECTED))
def test_public_ids_have_fastvideo_values(model_id):
    config, sampling = get_model_defaults(model_id)
    h, w, frames, fps, steps, g, g2, shift, boundary, expand, dmd, negative = EXPECTED[model_id]
    got = (sampling.height, sampling.width, sampling.num_frames, sampling.fps, sampling.num_inference_steps,
           sampling.guidance_scale, sampling.guidance_scale_2, config.flow_shift, config.boundary_ratio,
           config.expand_timesteps, config.dmd_denoising_steps, sampling.negative_prompt)
    assert got == EXPECTED[model_id]
    config.validate()
    spatial, temporal = _VAE[expand]
    sampling.replace(prompt="a cat").validate(spatial, 2, temporal)
    if dmd is not None:
        assert sampling.num_inference_steps == len(dmd)
        # FastWan2.1 is VSA-trained (its DiTs load with video sparse attention at FastVideo's 0.8); FastWan2.2's
        # TI2V presets run dense (the FullAttn checkpoint's own mode)
        want = ("video_sparse", 0.8) if "FastWan2.1" in model_id else ("dense", 0.0)
        assert (config.self_attention, config.vsa_sparsity) == want
        assert config.dit_overrides() == ({"attention_backend": "video_sparse_attn", "vsa_sparsity": 0.8}
                                          if want[0] == "video_sparse" else {})


def _dit(preset: str) -> dict:
    """A transformer config.json as the hub has it (diffusers writes image_dim: null for T2V models)."""
    return {"_class_name": "WanTransformer3DModel", "image_dim": None, "added_kv_proj_dim": None, "in_channels": 16,
            "out_channels": 16,
            **WAN_PRESETS[preset]}


@pytest.mark.parametrize("preset, index, expected", [
    ("wan2.1-t2v-1.3b", {"_class_name": "WanPipeline"}, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    ("wan2.1-t2v-1.3b", {"_class_name": "WanDMDPipeline"}, "FastVideo/FastWan2.1-T2V-1.3B-Diffusers"),
    ("wan2.1-t2v-1.3b", None, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    ("wan2.1-t2v-14b", {"_class_name": "WanPipeline"}, "Wan-AI/Wan2.1-T2V-14B-Diffusers"),
    ("wan2.1-t2v-14b", {"_class_name": "WanDMDPipeline"}, "FastVideo/FastWan2.1-T2V-14B-480P-Diffusers"),
    ("wan2.1-i2v-14b", {"_class_name": "WanImageToVideoPipeline"}, "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"),
    ("wan2.2-ti2v-5b", {"_class_name": "WanPipeline", "expand_timesteps": True}, "Wan-AI/Wan2.2-TI2V-5B-Diffusers"),
    ("wan2.2-t2v-a14b", {"_class_name": "WanPipeline", "boundary_ratio": 0.875}, "Wan-AI/Wan2.2-T2V-A14B-Diffusers"),
    ("wan2.2-t2v-a14b", None, "Wan-AI/Wan2.1-T2V-14B-Diffusers"),  # each expert has the 14B shape
    ("wan2.2-i2v-a14b", {"_class_name": "WanImageToVideoPipeline", "boundary_ratio": 0.9},
     "Wan-AI/Wan2.2-I2V-A14B-Diffusers"),
    ("wan2.2-i2v-a14b", None, "Wan-AI/Wan2.2-I2V-A14B-Diffusers"),
])
def test_found_by_content(preset, index, expected):
    entry = find_model_defaults("/some/local/copy", _dit(preset), index)
    assert entry.model_id == expected


def test_index_signature_needs_the_index():
    """An entry signed by its model index never matches on the DiT alone, and a different index value misses."""
    entry = find_model_defaults("FastVideo/FastWan2.1-T2V-1.3B-Diffusers")
    assert entry.matches(_dit("wan2.1-t2v-1.3b"), {"_class_name": "WanDMDPipeline"})
    assert not entry.matches(_dit("wan2.1-t2v-1.3b"))
    assert not entry.matches(_dit("wan2.1-t2v-1.3b"), {"_class_name": "WanPipeline"})
    assert not entry.matches(_dit("wan2.2-ti2v-5b"), {"_class_name": "WanDMDPipeline"})


@pytest.mark.parametrize("field, value, message", [
    ("boundary_ratio", 0.0, r"boundary_ratio must be in \(0, 1\)"),
    ("boundary_ratio", 1.0, r"boundary_ratio must be in \(0, 1\)"),
    ("boundary_ratio", 1.5, r"boundary_ratio must be in \(0, 1\)"),
    ("boundary_ratio", -0.2, r"boundary_ratio must be in \(0, 1\)"),
    ("boundary_ratio", math.nan, "boundary_ratio must be finite"),
    ("boundary_ratio", "0.9", "boundary_ratio must be a number"),
    ("boundary_ratio", True, "boundary_ratio must be a number"),
    ("expand_timesteps", 1, "expand_timesteps must be True or False"),
    ("dmd_denoising_steps", [1000, 757, 522], "dmd_denoising_steps must be a non-empty tuple"),
    ("dmd_denoising_steps", (), "dmd_denoising_steps must be a non-empty tuple"),
    ("dmd_denoising_steps", (1000, 757.0), r"dmd_denoising_steps\[1\] must be an integer"),
    ("dmd_denoising_steps", (1001, 757), r"dmd_denoising_steps\[0\] must be in \[1, 1000\]"),
    ("dmd_denoising_steps", (1000, 0), r"dmd_denoising_steps\[1\] must be in \[1, 1000\]"),
    ("dmd_denoising_steps", (757, 1000), "dmd_denoising_steps must be strictly decreasing"),
    ("dmd_denoising_steps", (1000, 757, 757), "dmd_denoising_steps must be strictly decreasing"),
])
def test_pipeline_field_errors(field, value, message):
    with pytest.raises(UserError, match=message):
        WanT2V480PConfig().replace(**{field: value}).validate()


def test_valid_wan22_fields_pass():
    config = PipelineConfig(boundary_ratio=0.5, expand_timesteps=True, dmd_denoising_steps=(1000, 500, 1))
    assert config.validate() is config


def test_self_attention_fields_are_checked():
    with pytest.raises(UserError, match="self_attention must be 'dense' or 'video_sparse'"):
        FastWan21T2V480PConfig().replace(self_attention="vsa").validate()
    with pytest.raises(UserError, match=r"vsa_sparsity must be in \[0, 1\)"):
        FastWan21T2V480PConfig().replace(vsa_sparsity=1.0).validate()


@pytest.mark.parametrize("value, message", [
    (-1.0, "guidance_scale_2 must be >= 0.0"),
    (math.inf, "guidance_scale_2 must be finite"),
    ("3", "guidance_scale_2 must be a number"),
])
def test_guidance_scale_2_errors(value, message):
    with pytest.raises(UserError, match=message):
        SamplingParam(prompt="a cat", guidance_scale_2=value).validate()
