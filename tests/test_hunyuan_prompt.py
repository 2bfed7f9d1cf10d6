"""HunyuanVideo's prompt path (template, crop_start, skip-layer hidden state, cropped mask; CLIP pooled output)
against Diffusers' ``HunyuanVideoPipeline.encode_prompt`` / ``_get_llama_prompt_embeds`` on noised tiny
Transformers encoders and tokenizers built in code (fp32)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tests.oracles import add_noise, errors

from fastvideo_jax.configs.models.encoders.clip import CLIP_TEXT_PRESETS
from fastvideo_jax.configs.models.encoders.llama import LLAMA_PRESETS
from fastvideo_jax.errors import UserError
from fastvideo_jax.models.encoders.hunyuan_prompt import (
    DEFAULT_PROMPT_TEMPLATE,
    encode_clip_pooled,
    encode_hunyuan_prompts,
    encode_llama_prompts,
    template_crop_start,
)
from fastvideo_jax.models.loader.component_loader import TextEncoderLoader
from fastvideo_jax.testing.tokenizer import build_clip_tokenizer, build_llama_tokenizer

TOL = 1e-5
PROMPTS = ["a cat playing piano in a sunny room", "a robot dancing", "waves crashing on rocks under a stormy sky "
           "while a bird flying over snowy mountains and a dog running on the beach at sunset"]
MAX_LEN = 12  # prompt tokens kept after the crop: the third prompt is truncated


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    from diffusers import HunyuanVideoPipeline

    root = tmp_path_factory.mktemp("hunyuan_prompt")
    tokenizer, tokenizer_2 = build_llama_tokenizer(), build_clip_tokenizer()
    torch.manual_seed(0)
    llama = add_noise(transformers.LlamaModel(transformers.LlamaConfig(**LLAMA_PRESETS["tiny"])).eval(), seed=1)
    llama.save_pretrained(root / "text_encoder")
    # The CLIP tokenizer's ids: <|startoftext|> 56, <|endoftext|> 57 (also its pad); 77 positions, as
    # Diffusers' encode_prompt tokenizes to 77.
    clip_cfg = {**CLIP_TEXT_PRESETS["tiny"], "bos_token_id": 56, "eos_token_id": 57, "pad_token_id": 57,
                "max_position_embeddings": 77}
    torch.manual_seed(2)
    clip = add_noise(transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_cfg)).eval(), seed=3)
    clip.save_pretrained(root / "text_encoder_2")
    pipe = HunyuanVideoPipeline(text_encoder=llama, tokenizer=tokenizer, transformer=None, vae=None, scheduler=None,
                                text_encoder_2=clip, tokenizer_2=tokenizer_2)
    loader = TextEncoderLoader()
    return SimpleNamespace(
        pipe=pipe, tokenizer=tokenizer, tokenizer_2=tokenizer_2, root=root,
        llama=loader.load(root / "text_encoder", precision="fp32"),
        clip=loader.load(root / "text_encoder_2"),
        template={"template": DEFAULT_PROMPT_TEMPLATE["template"],
                  "crop_start": template_crop_start(tokenizer, DEFAULT_PROMPT_TEMPLATE["template"])},
    )


def _close(got, want, what):
    got, want = np.asarray(got), want.detach().float().numpy() if torch.is_tensor(want) else np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    err, rel = errors(got, want)
    assert err <= TOL, f"{what}: max-abs {err:.3g}, relative {rel:.3g}"


def test_tiny_tokenizer_template_crops_at_the_prompt(env):
    """The tiny tokenizer knows every template word, so crop_start (computed as Diffusers does) is the index of
    the prompt's first token, as 95 is for llava-llama-3's tokenizer."""
    tok, template = env.tokenizer, env.template
    assert template["crop_start"] > 80
    ids = tok(template["template"].format("a robot dancing"))["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids[template["crop_start"]:]) == ["a", "robot", "dancing", "<|eot_id|>"]


@pytest.mark.parametrize("skip", [2, 0])
def test_llama_path_matches_diffusers(env, skip):
    want_embeds, want_mask = env.pipe._get_llama_prompt_embeds(
        PROMPTS, env.template, num_videos_per_prompt=2, device=torch.device("cpu"), dtype=torch.float32,
        max_sequence_length=MAX_LEN, num_hidden_layers_to_skip=skip)
    embeds, mask = encode_llama_prompts(env.tokenizer, env.llama, PROMPTS, prompt_template=env.template,
                                        max_sequence_length=MAX_LEN, num_hidden_layers_to_skip=skip,
                                        num_videos_per_prompt=2)
    assert embeds.shape == (6, MAX_LEN, LLAMA_PRESETS["tiny"]["hidden_size"])
    np.testing.assert_array_equal(mask, want_mask.numpy())
    _close(embeds, want_embeds, f"prompt embeddings, skip {skip}")
    # The cropped mask counts each prompt's tokens and its <|eot_id|>; the long prompt fills all MAX_LEN.
    np.testing.assert_array_equal(np.asarray(mask).sum(1), [9, 9, 4, 4, MAX_LEN, MAX_LEN])


def test_template_without_crop_start_is_computed_as_diffusers_does(env):
    template = {"template": DEFAULT_PROMPT_TEMPLATE["template"]}
    want, want_mask = env.pipe._get_llama_prompt_embeds(PROMPTS[:2], template, device=torch.device("cpu"),
                                                        dtype=torch.float32, max_sequence_length=MAX_LEN)
    got, mask = encode_llama_prompts(env.tokenizer, env.llama, PROMPTS[:2], prompt_template=template,
                                     max_sequence_length=MAX_LEN)
    np.testing.assert_array_equal(mask, want_mask.numpy())
    _close(got, want, "computed crop_start")


def test_encode_prompt_matches_diffusers(env):
    """Both encoders: Diffusers' encode_prompt (LLaMA skip 2, CLIP pooled at 77 tokens) and ours."""
    embeds, pooled, mask = env.pipe.encode_prompt(PROMPTS, prompt_template=env.template, num_videos_per_prompt=2,
                                                  device=torch.device("cpu"), dtype=torch.float32,
                                                  max_sequence_length=MAX_LEN)
    got = encode_hunyuan_prompts(env.tokenizer, env.llama, env.tokenizer_2, env.clip, PROMPTS,
                                 prompt_template=env.template, max_sequence_length=MAX_LEN, num_videos_per_prompt=2)
    _close(got[0], embeds, "prompt_embeds")
    np.testing.assert_array_equal(got[1], mask.numpy())
    _close(got[2], pooled, "pooled_prompt_embeds")
    assert got[2].shape == (6, CLIP_TEXT_PRESETS["tiny"]["hidden_size"])


def test_clip_pooled_takes_prompts_2(env):
    other = ["a red car driving through a city at night"] * len(PROMPTS)
    want = env.pipe._get_clip_prompt_embeds(other, device=torch.device("cpu"), dtype=torch.float32)
    _close(encode_clip_pooled(env.tokenizer_2, env.clip, other), want, "clip pooled")
    got = encode_hunyuan_prompts(env.tokenizer, env.llama, env.tokenizer_2, env.clip, PROMPTS, other,
                                 prompt_template=env.template, max_sequence_length=MAX_LEN)
    _close(got[2], want, "pooled from prompts_2")


def test_second_call_does_not_compile(env, count_compiles):
    kwargs = dict(prompt_template=env.template, max_sequence_length=MAX_LEN)
    first = encode_llama_prompts(env.tokenizer, env.llama, PROMPTS, **kwargs)[0]
    encode_clip_pooled(env.tokenizer_2, env.clip, PROMPTS)
    with count_compiles() as compiles:
        second = encode_llama_prompts(env.tokenizer, env.llama, PROMPTS[::-1], **kwargs)[0]
        encode_clip_pooled(env.tokenizer_2, env.clip, PROMPTS[::-1])
    assert compiles[0] == 0, f"a second call with the same shapes compiled {compiles[0]} times"
    np.testing.assert_array_equal(first[0], second[2])


def test_bad_inputs_are_user_errors(env, caplog):
    def run(**kwargs):
        return encode_llama_prompts(env.tokenizer, env.llama, PROMPTS, **{"prompt_template": env.template,
                                                                           "max_sequence_length": MAX_LEN, **kwargs})

    with pytest.raises(UserError, match=r"must be a string with exactly one '\{\}'"):
        run(prompt_template={"template": "no slot", "crop_start": 3})
    with pytest.raises(UserError, match=r"num_hidden_layers_to_skip=4 must be in \[0, 3\]"):
        run(num_hidden_layers_to_skip=4)
    with pytest.raises(UserError, match=r"crop_start'\] must be an int >= 0, got -1"):
        run(prompt_template={**env.template, "crop_start": -1})
    with pytest.raises(UserError, match="prompts must be a string or a non-empty list"):
        encode_llama_prompts(env.tokenizer, env.llama, [])
    with pytest.raises(UserError, match="token id .* outside the encoder's vocabulary of 99"):
        encode_clip_pooled(env.tokenizer, env.clip, PROMPTS)  # the LLaMA tokenizer into CLIP
    with caplog.at_level(logging.WARNING):
        run(prompt_template={**env.template, "crop_start": env.template["crop_start"] - 3})
    assert "are not the template's own" not in caplog.text  # too short a crop keeps template tokens: unseen
    with caplog.at_level(logging.WARNING):
        run(prompt_template={**DEFAULT_PROMPT_TEMPLATE})  # 95: the real tokenizer's crop, past the tiny prompts
    assert "are not the template's own" in caplog.text


def test_left_padding_tokenizer_is_padded_right_and_untouched(env):
    """The crop needs the template at the front of every row: a tokenizer that pads left (Transformers 5's
    LlamaTokenizerFast does) gives the same embeddings, and keeps its own padding side."""
    left = build_llama_tokenizer()
    left.padding_side = "left"
    kwargs = dict(prompt_template=env.template, max_sequence_length=MAX_LEN)
    got, mask = encode_llama_prompts(left, env.llama, PROMPTS, **kwargs)
    want, want_mask = encode_llama_prompts(env.tokenizer, env.llama, PROMPTS, **kwargs)
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_array_equal(got, want)
    assert left.padding_side == "left"


def test_llama_path_on_a_mesh_equals_one_device(env):
    """The encoder loaded on data=2 x sequence=4: the prompt path runs split over that mesh, same embeddings."""
    from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh

    encoder = TextEncoderLoader().load(env.root / "text_encoder", mesh=make_mesh(MeshConfig(data=2, sequence=4)),
                                       precision="fp32")
    kwargs = dict(prompt_template=env.template, max_sequence_length=MAX_LEN)
    got, mask = encode_llama_prompts(env.tokenizer, encoder, PROMPTS[:2], **kwargs)
    want, want_mask = encode_llama_prompts(env.tokenizer, env.llama, PROMPTS[:2], **kwargs)
    assert not got.sharding.is_fully_replicated, "the prompt path's work was not split over the mesh"
    np.testing.assert_array_equal(mask, want_mask)
    _close(got, want, "on a mesh")
