"""StepVideoPipeline end to end (``VideoGenerator`` on a directory in our layout, picked by model_index.json's
``_class_name``) vs a reference loop built from the PyTorch originals on the same weights and initial latents:
diffsynth's Step1Model (its kernel as sqrt-ALiBi, tests/test_stepllm.py), StepVideoModel and StepVideo VAE (its
chunked decode), Transformers' BertModel, the original's tokenizer wrapper and diffsynth's StepVideo scheduler and
loop (prompt + magic suffix, CFG 9 on [cond; uncond], shift 13, the reversed time axis). Latents <= 1e-4 relative,
frames PSNR >= 40 dB. Also: tokenizer parity, the schedule, presets, tiny-stepvideo by id, bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file
from tests.oracles import add_noise, errors
from tests.stepvideo_oracle import diffsynth_flow_scheduler, diffsynth_module
from tests.test_stepllm import _oracle_config, sqrt_alibi_flash_attn

from fastvideo_jax.configs.models.dits.stepvideo import STEPVIDEO_PRESETS
from fastvideo_jax.configs.models.encoders.bert import BERT_PRESETS
from fastvideo_jax.configs.models.encoders.stepllm import STEPLLM_PRESETS
from fastvideo_jax.configs.models.vaes.stepvideovae import STEPVIDEO_VAE_PRESETS
from fastvideo_jax.configs.pipelines.base import PipelineConfig
from fastvideo_jax.configs.pipelines.registry import get_model_defaults
from fastvideo_jax.configs.pipelines.stepvideo import NEG_MAGIC, POS_MAGIC, StepVideoT2VConfig
from fastvideo_jax.configs.sample import SamplingParam
from fastvideo_jax.entrypoints.model_spec import ModelSpec
from fastvideo_jax.entrypoints.video_generator import VideoGenerator
from fastvideo_jax.errors import CheckpointError, UserError
from fastvideo_jax.models.encoders.stepvideo_prompt import encode_stepvideo_prompts
from fastvideo_jax.pipelines.stepvideo import StepVideoPipeline, stepvideo_tables
from fastvideo_jax.schedulers.flow_match_euler import FlowMatchEulerScheduler
from fastvideo_jax.testing.tiny_stepvideo import INDEX, TINY_STEPLLM, TINY_STEPVIDEO_BERT
from fastvideo_jax.testing.tokenizer import build_bert_tokenizer, write_bert_tokenizer, write_step_tokenizer

LLM = {**STEPLLM_PRESETS["tiny"], **TINY_STEPLLM}  # the tiny SentencePiece model has 120 pieces
BERT = {**BERT_PRESETS["tiny"], **TINY_STEPVIDEO_BERT}  # the tiny BertTokenizer has 129 tokens
VAE = dict(STEPVIDEO_VAE_PRESETS["tiny"])
DIT = {**STEPVIDEO_PRESETS["tiny"], "in_channels": VAE["z_channels"], "out_channels": VAE["z_channels"],
       "caption_channels": [LLM["hidden_size"], BERT["hidden_size"]]}
TEXT_LEN, CLIP_LEN = 24, 13
CONFIG = StepVideoT2VConfig(text_len=TEXT_LEN, clip_len=CLIP_LEN, dit_precision="fp32", vae_decode_precision="fp32",
                            text_encoder_precisions=("fp32", "fp32"))
PROMPT = "a cat playing piano"
REQUEST = dict(height=32, width=48, num_frames=17, num_inference_steps=3, guidance_scale=9.0)


def _save(directory, model, weights_name, config, rename=lambda k: k):
    directory.mkdir(parents=True)
    save_file({rename(k): v.contiguous() for k, v in model.state_dict().items()}, str(directory / weights_name))
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The PyTorch originals (noised) saved as a pipeline directory in our layout, and ours loaded from it (fp32)."""
    from tests.test_stepvideo_vae import _tiny_original

    root = tmp_path_factory.mktemp("stepvideo")
    llm_oracle = diffsynth_module("stepvideo_text_encoder")
    llm = llm_oracle.Step1Model(_oracle_config(**LLM)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in llm.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            scale = 1.0 if "embeddings" in name else 0.08
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else scale * noise)
    _save(root / "text_encoder", llm, "model.safetensors", {"architectures": ["Step1Model"], **LLM})
    torch.manual_seed(1)
    bert = add_noise(transformers.BertModel(transformers.BertConfig(**BERT)).eval(), seed=2)
    bert.save_pretrained(root / "text_encoder_2")
    torch.manual_seed(3)
    dit = add_noise(diffsynth_module("stepvideo_dit").StepVideoModel(**DIT).eval(), seed=4)
    _save(root / "transformer", dit, "diffusion_pytorch_model.safetensors", {"_class_name": "StepVideoModel", **DIT})
    torch.manual_seed(5)
    vae = add_noise(_tiny_original(), seed=6)
    vae_config = {"_class_name": "AutoencoderKLStepvideo",
                  **{k: list(v) if isinstance(v, tuple) else v for k, v in VAE.items()}}
    _save(root / "vae", vae, "diffusion_pytorch_model.safetensors", vae_config,
          rename=lambda k: k.replace("decoder.conv_out.conv.", "decoder.conv_out."))  # the release's names
    sp = write_step_tokenizer(root / "tokenizer")
    write_bert_tokenizer(root / "tokenizer_2")
    (root / "scheduler").mkdir()
    (root / "scheduler/scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1, "shift": 1.0}))
    (root / "model_index.json").write_text(json.dumps(INDEX))
    ours = VideoGenerator.from_pretrained(root, pipeline_config=CONFIG)
    return SimpleNamespace(llm_oracle=llm_oracle, llm=llm, bert=bert, dit=dit, vae=vae, sp=sp, root=root, gen=ours,
                           ours=ours.pipeline.components)


def _reference(parts, texts, latents, steps, cfg, monkeypatch):
    """diffsynth's StepVideo loop on the PyTorch modules (B = 1 per call, as it runs) and the original VAE's
    decode: latents (B, C, F, H, W) and uint8-rounded frames (B, F, H, W, 3)."""
    monkeypatch.setattr(parts.llm_oracle, "flash_attn_func", sqrt_alibi_flash_attn)
    tok = parts.llm_oracle.Wrapped_StepChatTokenizer(str(parts.sp))(texts, max_length=TEXT_LEN)
    bert_in = build_bert_tokenizer()(texts, padding="max_length", max_length=CLIP_LEN, truncation=True,
                                     return_tensors="pt")
    with torch.no_grad():
        llm = parts.llm(tok.input_ids).transpose(0, 1)
        clip = parts.bert(input_ids=bert_in.input_ids, attention_mask=bert_in.attention_mask).last_hidden_state
    mask = torch.nn.functional.pad(tok.attention_mask, (CLIP_LEN, 0), value=1).float()
    sched = diffsynth_flow_scheduler()
    sched.set_timesteps(steps)
    x = torch.from_numpy(np.asarray(latents)).permute(0, 2, 1, 3, 4)  # the original's (B, F, C, H, W)
    with torch.no_grad():
        for t in sched.timesteps:
            ts = t.unsqueeze(0)
            pos, neg = (parts.dit(x, timestep=ts, encoder_hidden_states=llm[i:i + 1],
                                  encoder_hidden_states_2=clip[i:i + 1], encoder_attention_mask=mask[i:i + 1])
                        for i in (0, 1))
            x = sched.step(neg + cfg * (pos - neg), t, x)
        diffsynth_module("stepvideo_vae").base_group_norm.spatial = True  # as StepVideoVAE(version=2) sets it
        video = parts.vae.decode(x, device="cpu")  # (B, F, C, H, W), about [-1, 1]
    frames = ((video.clamp(-1, 1) + 1) * 127.5).permute(0, 1, 3, 4, 2).numpy()
    return x.permute(0, 2, 1, 3, 4).numpy(), frames


def test_class_name_picks_the_stepvideo_pipeline(parts):
    assert type(parts.gen.pipeline).__name__ == "StepVideoPipeline"
    assert parts.gen.pipeline.scheduler.shift == 13.0  # the preset's shift replaces the scheduler config's


def test_end_to_end_matches_reference_loop(parts, monkeypatch):
    latents = np.random.default_rng(0).standard_normal((1, VAE["z_channels"], 3, 2, 3)).astype(np.float32)
    out = parts.gen.generate_video(PROMPT, latents=latents, progress=False, **REQUEST)
    want, frames = _reference(parts, [PROMPT + POS_MAGIC, NEG_MAGIC], latents, 3, 9.0, monkeypatch)
    err, rel = errors(np.asarray(out["latents"]), want)
    assert rel <= 1e-4, f"latents vs the reference loop: max-abs {err:.3g}, relative {rel:.3g}"
    assert errors(np.asarray(out["latents"]), latents)[1] > 0.1, "the latents did not move"
    mse = np.mean((out["frames"].astype(np.float64) - frames[0]) ** 2)
    psnr = 10 * np.log10(255**2 / max(mse, 1e-12))
    assert out["frames"].shape == (17, 32, 48, 3) and psnr >= 40, f"frames PSNR {psnr:.1f} dB"


def test_negative_prompt_goes_before_the_magic_suffix(parts):
    stage = parts.gen.pipeline.stages[1]
    param = SamplingParam(prompt="x", negative_prompt="blurry ")
    assert stage.texts(param, 2, True) == ["x" + POS_MAGIC] * 2 + ["blurry " + NEG_MAGIC] * 2
    assert stage.texts(param, 1, False) == ["x" + POS_MAGIC]


def test_tokenizer_is_the_originals(parts):
    texts = [PROMPT + POS_MAGIC, NEG_MAGIC, "", "a robot dancing in the rain " * 4]
    want = parts.llm_oracle.Wrapped_StepChatTokenizer(str(parts.sp))(texts, max_length=TEXT_LEN)
    ids, mask = parts.ours["tokenizer"](texts, TEXT_LEN)
    np.testing.assert_array_equal(ids, want.input_ids.numpy())
    np.testing.assert_array_equal(mask, want.attention_mask.numpy())


def test_schedule_is_the_originals():
    sched = diffsynth_flow_scheduler(shift=17.0)
    sched.set_timesteps(7)
    tables = stepvideo_tables(FlowMatchEulerScheduler(shift=17.0), 7)
    np.testing.assert_allclose(np.asarray(tables.timesteps), sched.timesteps.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(tables.sigmas), [*sched.sigmas.numpy(), 1.0], atol=1e-6)


@pytest.mark.parametrize("model_id,shift,steps,cfg", [("stepfun-ai/stepvideo-t2v", 13.0, 50, 9.0),
                                                      ("FastVideo/stepvideo-t2v-diffusers", 13.0, 50, 9.0),
                                                      ("stepfun-ai/stepvideo-t2v-turbo", 17.0, 15, 5.0)])
def test_presets(model_id, shift, steps, cfg):
    config, sampling = get_model_defaults(model_id)
    assert isinstance(config, StepVideoT2VConfig) and config.flow_shift == shift
    assert (sampling.num_inference_steps, sampling.guidance_scale) == (steps, cfg)
    assert (sampling.height, sampling.width, sampling.num_frames) == (544, 992, 204)
    assert config.pos_magic == POS_MAGIC and config.text_len == 320 and config.clip_len == 77


def test_tiny_stepvideo_by_id(tmp_path, monkeypatch):
    """``tiny-stepvideo`` (random weights written by our models into the cache): by id, through its presets."""
    monkeypatch.setenv("FASTVIDEO_JAX_CACHE", str(tmp_path))
    gen = VideoGenerator.from_pretrained("tiny-stepvideo")
    assert type(gen.pipeline).__name__ == "StepVideoPipeline" and gen.defaults.num_frames == 17
    out = gen.generate_video("a cat", progress=False, num_inference_steps=2)
    assert out["frames"].shape == (17, 32, 32, 3) and out["frames"].dtype == np.uint8


def test_bad_inputs(parts):
    with pytest.raises(UserError, match=r"num_frames must be a multiple of 17 .* got 21"):
        parts.gen.sampling_param(prompt="x", num_frames=21)
    with pytest.raises(UserError, match=r"height and width must be positive multiples of 16"):
        parts.gen.sampling_param(prompt="x", height=40)
    with pytest.raises(UserError, match="prompt"):
        parts.gen.generate_video("", progress=False, **REQUEST)
    with pytest.raises(CheckpointError, match="flow-match Euler scheduler"):
        StepVideoPipeline({**parts.ours, "scheduler": object()}, CONFIG)
    with pytest.raises(CheckpointError, match="the VAE decodes 17-frame chunks, the config says frame_chunk=16"):
        StepVideoPipeline(parts.ours, CONFIG.replace(frame_chunk=16))
    with pytest.raises(TypeError, match="needs a StepVideoT2VConfig"):
        StepVideoPipeline(parts.ours, PipelineConfig())
    with pytest.raises(UserError, match="pos_magic must be a string"):
        StepVideoT2VConfig(pos_magic=None).validate()
    # a tokenizer whose ids the encoder's table cannot hold: refused before the encoder runs
    narrow = SimpleNamespace(config=SimpleNamespace(arch_config=SimpleNamespace(vocab_size=50)))
    with pytest.raises(UserError, match="outside the encoder's vocabulary of 50"):
        encode_stepvideo_prompts(parts.ours["tokenizer"], narrow, parts.ours["tokenizer_2"], narrow,
                                 [PROMPT + POS_MAGIC], text_len=TEXT_LEN, clip_len=CLIP_LEN)
    index = {k: v for k, v in INDEX.items() if k != "text_encoder_2"}
    (parts.root / "model_index.json").write_text(json.dumps(index))
    try:
        with pytest.raises(CheckpointError, match=r"StepVideoPipeline needs the components \['text_encoder_2'\]"):
            ModelSpec.open(parts.root)
    finally:
        (parts.root / "model_index.json").write_text(json.dumps(INDEX))


def test_release_layout_loads(parts, tmp_path):
    """The release's / FastVideo's layout: model_index.json lists transformer, scheduler and vae only; the text
    encoders and tokenizers sit in step_llm/ and hunyuan_clip/{clip_text_encoder,tokenizer}/. Same latents as
    our layout, also with the release's BERT as a PyTorch pickle only (read by the torch-free restricted
    unpickler); no weights at all is a clear error before any weight is read."""
    import shutil

    root = tmp_path / "release"
    for name in ("transformer", "vae", "scheduler"):
        shutil.copytree(parts.root / name, root / name)
    shutil.copytree(parts.root / "text_encoder", root / "step_llm")
    shutil.copy(parts.sp, root / "step_llm" / parts.sp.name)
    shutil.copytree(parts.root / "text_encoder_2", root / "hunyuan_clip" / "clip_text_encoder")
    shutil.copytree(parts.root / "tokenizer_2", root / "hunyuan_clip" / "tokenizer")
    (root / "model_index.json").write_text(json.dumps(
        {k: v for k, v in INDEX.items() if k in ("_class_name", "transformer", "vae", "scheduler")}))
    spec = ModelSpec.open(root, pipeline_config=CONFIG)
    assert dict(spec.folders) == {"text_encoder": "step_llm", "tokenizer": "step_llm",
                                  "text_encoder_2": "hunyuan_clip/clip_text_encoder",
                                  "tokenizer_2": "hunyuan_clip/tokenizer"}
    gen = VideoGenerator.from_spec(spec)
    latents = np.random.default_rng(1).standard_normal((1, VAE["z_channels"], 3, 2, 3)).astype(np.float32)
    request = dict(REQUEST, num_inference_steps=2)
    got = gen.generate_video(PROMPT, latents=latents, progress=False, **request)["latents"]
    want = parts.gen.generate_video(PROMPT, latents=latents, progress=False, **request)["latents"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    bert_dir = root / "hunyuan_clip" / "clip_text_encoder"
    torch.save(parts.bert.state_dict(), bert_dir / "pytorch_model.bin")
    for f in bert_dir.glob("*.safetensors"):
        f.unlink()
    gen = VideoGenerator.from_spec(ModelSpec.open(root, pipeline_config=CONFIG))  # through the safe unpickler
    got = gen.generate_video(PROMPT, latents=latents, progress=False, **request)["latents"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    (bert_dir / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match=r"clip_text_encoder: no weight files \(\*\.safetensors, or PyTorch"):
        ModelSpec.open(root, pipeline_config=CONFIG)  # checked with the configs, before any weight is read
