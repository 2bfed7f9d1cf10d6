"""HunyuanVideo end to end: our HunyuanVideoPipeline (picked by model_index.json's _class_name) vs diffusers'
on the same tiny noised components and initial latents; embedded guidance needs no retrace; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastvideo_jax.configs.models.dits.hunyuanvideo import HUNYUAN_PRESETS
from fastvideo_jax.configs.models.encoders.clip import CLIP_TEXT_PRESETS
from fastvideo_jax.configs.models.encoders.llama import LLAMA_PRESETS
from fastvideo_jax.configs.models.vaes.hunyuanvae import HUNYUAN_VAE_PRESETS
from fastvideo_jax.entrypoints.model_spec import ModelSpec
from fastvideo_jax.entrypoints.video_generator import VideoGenerator
from fastvideo_jax.errors import CheckpointError, UserError
from fastvideo_jax.models.encoders.hunyuan_prompt import DEFAULT_PROMPT_TEMPLATE, template_crop_start
from fastvideo_jax.testing.tokenizer import build_clip_tokenizer, build_llama_tokenizer
from tests.oracles import add_noise, errors

TEXT_LEN = 12
FP32 = dict(dit_precision="fp32", vae_decode_precision="fp32", text_encoder_precisions=("fp32", "fp32"),
            text_len=TEXT_LEN)
REQUEST = dict(height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=6.0)


@pytest.fixture(scope="module")
def diffusers_pipe(tmp_path_factory):
    """A noised tiny diffusers HunyuanVideoPipeline, saved with save_pretrained."""
    import transformers
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)

    llama_cfg, clip_cfg = LLAMA_PRESETS["tiny"], {**CLIP_TEXT_PRESETS["tiny"], "bos_token_id": 56, "eos_token_id": 57,
                                                  "pad_token_id": 57, "max_position_embeddings": 77}
    torch.manual_seed(0)
    transformer = add_noise(HunyuanVideoTransformer3DModel(**{
        **HUNYUAN_PRESETS["tiny"], "in_channels": 16, "out_channels": 16, "text_embed_dim": llama_cfg["hidden_size"],
        "pooled_projection_dim": clip_cfg["hidden_size"]}).eval(), seed=1)
    vae_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in HUNYUAN_VAE_PRESETS["tiny"].items()}
    vae = add_noise(AutoencoderKLHunyuanVideo(**vae_cfg).eval(), scale=0.05, seed=2)
    llama = add_noise(transformers.LlamaModel(transformers.LlamaConfig(**llama_cfg)).eval(), seed=3)
    clip = add_noise(transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_cfg)).eval(), seed=4)
    pipe = HunyuanVideoPipeline(text_encoder=llama, tokenizer=build_llama_tokenizer(), transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip,
                                tokenizer_2=build_clip_tokenizer())
    root = tmp_path_factory.mktemp("hunyuan_pipe")
    pipe.save_pretrained(root)
    return root, pipe


@pytest.fixture(scope="module")
def ours(diffusers_pipe):
    return VideoGenerator.from_pretrained(diffusers_pipe[0], **FP32)


def test_class_name_picks_the_hunyuan_pipeline(ours):
    assert type(ours.pipeline).__name__ == "HunyuanVideoPipeline"
    assert ours.pipeline.config.flow_shift == 7.0 and ours.defaults.guidance_scale == 6.0


def test_end_to_end_parity_with_diffusers(diffusers_pipe, ours):
    _, pipe = diffusers_pipe
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    prompt_template = {"template": template, "crop_start": template_crop_start(pipe.tokenizer, template)}
    latents = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(5))
    kwargs = dict(prompt="a cat playing piano", prompt_template=prompt_template, max_sequence_length=TEXT_LEN,
                  **REQUEST)
    with torch.no_grad():
        ref_latents = pipe(latents=latents.clone(), output_type="latent", **kwargs).frames.float().numpy()
        ref_frames = pipe(latents=latents.clone(), output_type="np", **kwargs).frames  # (1, F, H, W, 3) in [0, 1]
    out = ours.generate_video("a cat playing piano", latents=latents.numpy(), progress=False, **REQUEST)
    err, rel = errors(out["latents"], ref_latents)
    assert rel < 1e-4, f"final latents: max-abs {err:.3e}, relative {rel:.3e}"
    mse = np.mean((out["frames"].astype(np.float64) - np.asarray(ref_frames[0], np.float64) * 255) ** 2)
    psnr = 10 * np.log10(255**2 / max(mse, 1e-12))
    assert out["frames"].shape == (5, 32, 48, 3) and psnr >= 40, f"frames PSNR {psnr:.1f} dB"


def test_guidance_and_steps_do_not_retrace(ours, monkeypatch):
    import fastvideo_jax.pipelines.stages.denoising as denoising

    traces = []
    real = denoising._denoise_step

    def counting(*args, **kwargs):
        traces.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(denoising, "_denoise_step", counting)
    from fastvideo_jax.pipelines.hunyuan import HunyuanVideoPipeline

    fresh = VideoGenerator(HunyuanVideoPipeline(ours.pipeline.components, ours.pipeline.config), ours.defaults,
                           ours.model_path)
    frames = [fresh.generate_video("a dog", progress=False, **{**REQUEST, "guidance_scale": g, "num_inference_steps": n})
              ["frames"] for g, n in [(6.0, 2), (1.0, 3), (9.5, 4)]]
    assert len(traces) == 1, f"traced {len(traces)} times"
    assert not np.array_equal(frames[0], frames[1])


def test_bad_input_is_clear(diffusers_pipe, ours, tmp_path):
    with pytest.raises(UserError, match="embedded guidance"):
        ours.generate_video("a cat", negative_prompt="blurry", progress=False, **REQUEST)
    with pytest.raises(UserError, match="num_frames must be 1 \\+ 4k"):
        ours.sampling_param(prompt="a cat", num_frames=8)
    with pytest.raises(UserError, match="multiples of 16"):
        ours.sampling_param(prompt="a cat", height=40)
    import json
    import shutil

    root = tmp_path / "no_clip"
    shutil.copytree(diffusers_pipe[0], root)
    index = json.loads((root / "model_index.json").read_text())
    index.pop("text_encoder_2")
    (root / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"HunyuanVideoPipeline needs the components \['text_encoder_2'\]"):
        ModelSpec.open(root)


def test_mask_strategy_reaches_the_sliding_tile_dit(diffusers_pipe, ours):
    """HunyuanVideoPipeline(mask_strategy=) over a sliding-tile DiT: full windows on every (step, layer, head)
    give the dense pipeline's latents; (1, 1, 1) windows change them; a dense DiT refuses a strategy."""
    from fastvideo_jax.attention.sliding_tile_strategy import load_mask_strategy
    from fastvideo_jax.models.loader.component_loader import TransformerLoader
    from fastvideo_jax.pipelines.hunyuan import HunyuanVideoPipeline

    arch = ours.pipeline.transformer.config.arch_config
    layers, heads = arch.num_layers + arch.num_single_layers, arch.num_attention_heads
    sta_dit = TransformerLoader().load(diffusers_pipe[0] / "transformer", precision="fp32",
                                       self_attention_backend="sliding_tile", sta_tile=(1, 1, 1))
    latents = np.random.default_rng(6).standard_normal((1, 16, 2, 4, 6)).astype(np.float32)

    def run(transformer, window):
        strategy = load_mask_strategy({f"{s}_{layer}_{h}": list(window) for s in range(REQUEST["num_inference_steps"])
                                       for layer in range(layers) for h in range(heads)})
        pipe = HunyuanVideoPipeline({**ours.pipeline.components, "transformer": transformer}, ours.pipeline.config,
                                    mask_strategy=strategy)
        out = VideoGenerator(pipe, ours.defaults, ours.model_path).generate_video(
            "a dog", latents=latents, progress=False, **REQUEST)
        return out["latents"]

    dense = ours.generate_video("a dog", latents=latents, progress=False, **REQUEST)["latents"]
    full = run(sta_dit, (9, 9, 9))
    assert errors(full, dense)[0] < 1e-5
    assert errors(run(sta_dit, (1, 1, 1)), dense)[0] > 1e-4
    with pytest.raises(ValueError, match="sliding-tile transformer"):
        run(ours.pipeline.transformer, (9, 9, 9))
