"""StepVideoPipeline vs a reference loop built from the PyTorch originals on the same weights and initial latents:
diffsynth's Step1Model (its kernel as sqrt-ALiBi, tests/test_stepllm.py) and StepVideoModel, Transformers' BertModel,
the original's tokenizer wrapper and diffsynth's StepVideo scheduler and loop (prompt + magic suffix, CFG 9 on
[cond; uncond], shift 13, the reversed time axis). Latents <= 1e-4 relative. Also: tokenizer parity, the
schedule, presets, bad input."""

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

from fastvideo_jax.configs.models.encoders.bert import BERT_PRESETS
from fastvideo_jax.configs.models.encoders.stepllm import STEPLLM_PRESETS
from fastvideo_jax.configs.pipelines.base import PipelineConfig
from fastvideo_jax.configs.pipelines.registry import get_model_defaults
from fastvideo_jax.configs.pipelines.stepvideo import NEG_MAGIC, POS_MAGIC, StepVideoT2VConfig
from fastvideo_jax.configs.sample import SamplingParam
from fastvideo_jax.errors import CheckpointError, UserError
from fastvideo_jax.models.encoders.stepvideo_prompt import StepChatTokenizer, encode_stepvideo_prompts
from fastvideo_jax.models.loader.component_loader import TextEncoderLoader, TransformerLoader
from fastvideo_jax.pipelines.stages import DecodingStage
from fastvideo_jax.pipelines.stages.validation import check_request
from fastvideo_jax.pipelines.stepvideo import StepVideoPipeline, stepvideo_tables
from fastvideo_jax.schedulers.flow_match_euler import FlowMatchEulerScheduler
from fastvideo_jax.testing.tokenizer import build_bert_tokenizer, write_step_tokenizer

LLM = dict(STEPLLM_PRESETS["tiny"], padded_vocab_size=128)  # the tiny SentencePiece model has 120 pieces
BERT = dict(BERT_PRESETS["tiny"], vocab_size=130, max_position_embeddings=40)  # the tiny BertTokenizer has 129
TEXT_LEN, CLIP_LEN = 24, 13
CONFIG = StepVideoT2VConfig(text_len=TEXT_LEN, clip_len=CLIP_LEN, dit_precision="fp32",
                            text_encoder_precisions=("fp32", "fp32"))
PROMPT = "a cat playing piano"


def _dit_arch():
    from fastvideo_jax.configs.models.dits.stepvideo import STEPVIDEO_PRESETS

    arch = dict(STEPVIDEO_PRESETS["tiny"])
    return {**arch, "caption_channels": [LLM["hidden_size"], BERT["hidden_size"]]}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The PyTorch originals (noised) and ours loaded from their saved weights, all fp32."""
    root = tmp_path_factory.mktemp("stepvideo")
    llm_oracle = diffsynth_module("stepvideo_text_encoder")
    llm = llm_oracle.Step1Model(_oracle_config(**LLM)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in llm.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            scale = 1.0 if "embeddings" in name else 0.08
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else scale * noise)
    (root / "text_encoder").mkdir()
    save_file({k: v.contiguous() for k, v in llm.state_dict().items()}, str(root / "text_encoder/model.safetensors"))
    (root / "text_encoder/config.json").write_text(json.dumps({"architectures": ["Step1Model"], **LLM}))
    torch.manual_seed(1)
    bert = add_noise(transformers.BertModel(transformers.BertConfig(**BERT)).eval(), seed=2)
    bert.save_pretrained(root / "text_encoder_2")
    torch.manual_seed(3)
    arch = _dit_arch()
    dit = add_noise(diffsynth_module("stepvideo_dit").StepVideoModel(**arch).eval(), seed=4)
    (root / "transformer").mkdir()
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()},
              str(root / "transformer/diffusion_pytorch_model.safetensors"))
    (root / "transformer/config.json").write_text(json.dumps({"_class_name": "StepVideoModel", **arch}))
    sp = write_step_tokenizer(root / "tokenizer")
    ours = dict(tokenizer=StepChatTokenizer(sp), tokenizer_2=build_bert_tokenizer(),
                text_encoder=TextEncoderLoader().load(root / "text_encoder", precision="fp32"),
                text_encoder_2=TextEncoderLoader().load(root / "text_encoder_2", precision="fp32"),
                transformer=TransformerLoader().load(root / "transformer", precision="fp32"),
                scheduler=FlowMatchEulerScheduler(), vae=_vae_stand_in())
    return SimpleNamespace(llm_oracle=llm_oracle, llm=llm, bert=bert, dit=dit, sp=sp, ours=ours)


def _vae_stand_in():
    """Geometry only (StepVideo's VAE: 16x spatial, 8x temporal, 17-frame chunks): these tests stop before
    decoding."""
    arch = SimpleNamespace(spatial_compression_ratio=16, temporal_compression_ratio=8, z_dim=64)
    return SimpleNamespace(config=SimpleNamespace(arch_config=arch, precision="fp32"))


def _latents_before_decoding(pipe, param, latents):
    batch = pipe.initial_batch(param, latents)
    for stage in pipe.stages:
        if isinstance(stage, DecodingStage):
            break
        batch = stage(batch)
    return np.asarray(batch.latents)


def _reference(parts, texts, latents, steps, cfg, monkeypatch):
    """diffsynth's StepVideo loop on the PyTorch modules (B = 1 per call, as it runs), (B, C, F, H, W) out."""
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
    return x.permute(0, 2, 1, 3, 4).numpy()


def test_pipeline_latents_match_reference_loop(parts, monkeypatch):
    pipe = StepVideoPipeline(parts.ours, CONFIG)
    param = SamplingParam(prompt=PROMPT, height=32, width=48, num_frames=17, num_inference_steps=3,
                          guidance_scale=9.0, seed=0)
    latents = np.random.default_rng(0).standard_normal((1, 8, 3, 2, 3)).astype(np.float32)
    got = _latents_before_decoding(pipe, param, latents)
    want = _reference(parts, [PROMPT + POS_MAGIC, NEG_MAGIC], latents, 3, 9.0, monkeypatch)
    err, rel = errors(got, want)
    assert rel <= 1e-4, f"latents vs the reference loop: max-abs {err:.3g}, relative {rel:.3g}"
    assert errors(got, latents)[1] > 0.1, "the latents did not move"


def test_negative_prompt_goes_before_the_magic_suffix(parts):
    stage = StepVideoPipeline(parts.ours, CONFIG).stages[1]
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


def test_bad_inputs(parts):
    pipe = StepVideoPipeline(parts.ours, CONFIG)
    dit_arch, vae_arch = parts.ours["transformer"].config.arch_config, parts.ours["vae"].config.arch_config
    with pytest.raises(UserError, match=r"num_frames must be a multiple of 17 .* got 21"):
        check_request(SamplingParam(prompt="x", height=32, width=48, num_frames=21), dit_arch, vae_arch, CONFIG)
    with pytest.raises(UserError, match=r"height and width must be positive multiples of 16"):
        pipe(SamplingParam(prompt="x", height=40, width=48, num_frames=17))
    with pytest.raises(CheckpointError, match="flow-match Euler scheduler"):
        StepVideoPipeline({**parts.ours, "scheduler": object()}, CONFIG)
    with pytest.raises(TypeError, match="needs a StepVideoT2VConfig"):
        StepVideoPipeline(parts.ours, PipelineConfig())
    with pytest.raises(CheckpointError, match="needs the component"):
        StepVideoPipeline({k: v for k, v in parts.ours.items() if k != "tokenizer_2"}, CONFIG)
    with pytest.raises(UserError, match="pos_magic must be a string"):
        StepVideoT2VConfig(pos_magic=None).validate()
    # a tokenizer whose ids the encoder's table cannot hold: refused before the encoder runs
    narrow = SimpleNamespace(config=SimpleNamespace(arch_config=SimpleNamespace(vocab_size=50)))
    with pytest.raises(UserError, match="outside the encoder's vocabulary of 50"):
        encode_stepvideo_prompts(parts.ours["tokenizer"], narrow, parts.ours["tokenizer_2"], narrow,
                                 [PROMPT + POS_MAGIC], text_len=TEXT_LEN, clip_len=CLIP_LEN)
