"""A pipeline directory holding CLIP components (image_encoder + image_processor as Wan I2V has them,
text_encoder_2 + tokenizer_2 as HunyuanVideo has them) loads through ``load_components`` and encodes as
Transformers does: the penultimate vision hidden state of a processed image, the pooled text output."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tests.oracles import add_noise, errors
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from fastvideo_jax.configs.models.encoders.clip import CLIP_TEXT_PRESETS, CLIP_VISION_PRESETS
from fastvideo_jax.models.encoders.clip import CLIPTextModel, CLIPVisionModelWithProjection
from fastvideo_jax.models.encoders.image_processor import CLIPImageProcessor
from fastvideo_jax.models.loader.pipeline_loader import check_components, component_kind, load_components
from fastvideo_jax.models.loader.safetensors_io import CheckpointError
from fastvideo_jax.testing.tokenizer import write_clip_tokenizer

VISION = dict(CLIP_VISION_PRESETS["tiny"])
TOKENS = dict(bos_token_id=56, eos_token_id=57, pad_token_id=57)  # write_clip_tokenizer's ids
TEXT = {**CLIP_TEXT_PRESETS["tiny"], **TOKENS}
INDEX = {
    "_class_name": "ClipComponentsForTest",
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "image_processor": ["transformers", "CLIPImageProcessor"],
    "text_encoder_2": ["transformers", "CLIPTextModel"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("clip_pipe")
    torch.manual_seed(0)
    vision = add_noise(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION)).eval(), seed=3)
    vision.save_pretrained(root / "image_encoder")
    size = VISION["image_size"]
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        root / "image_processor")
    text = add_noise(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)).eval(), seed=4)
    text.save_pretrained(root / "text_encoder_2")
    write_clip_tokenizer(root / "tokenizer_2")
    (root / "model_index.json").write_text(json.dumps(INDEX))
    return SimpleNamespace(root=root, vision=vision, text=text, parts=load_components(root))


def test_component_kinds():
    kinds = {n: component_kind(n) for n in ("image_encoder", "image_processor", "text_encoder_2", "tokenizer_2")}
    assert kinds == {"image_encoder": "model", "image_processor": "image_processor", "text_encoder_2": "model",
                     "tokenizer_2": "tokenizer"}


def test_every_component_loads(pipe):
    parts = pipe.parts
    assert sorted(parts) == sorted(n for n in INDEX if not n.startswith("_"))
    assert isinstance(parts["image_encoder"], CLIPVisionModelWithProjection)
    assert isinstance(parts["text_encoder_2"], CLIPTextModel)
    assert isinstance(parts["image_processor"], CLIPImageProcessor)
    assert parts["image_processor"].crop_size == (VISION["image_size"],) * 2
    assert type(parts["tokenizer_2"]).__name__ == "CLIPTokenizer"


def test_image_path_equals_transformers(pipe):
    """Processor + vision tower as Wan I2V uses them: hidden_states[-2] of the processed image."""
    image = np.random.default_rng(0).integers(0, 256, (45, 71, 3), dtype=np.uint8)
    pixels = pipe.parts["image_processor"](image)
    ref_pixels = CLIPImageProcessorPil.from_pretrained(pipe.root / "image_processor")(images=image, return_tensors="np")
    np.testing.assert_array_equal(pixels, ref_pixels["pixel_values"])
    got = pipe.parts["image_encoder"](jnp.asarray(pixels), output_hidden_states=True).hidden_states[-2]
    with torch.no_grad():
        want = pipe.vision(pixel_values=torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-2].numpy()
    err, rel = errors(got, want)
    assert err <= 1e-5, f"penultimate hidden state: max-abs {err:.3g}, relative {rel:.3g}"


def test_text_path_equals_transformers(pipe):
    """Tokenizer + text tower as HunyuanVideo uses them: the pooled output of padded prompts."""
    batch = pipe.parts["tokenizer_2"](["the cat", "a cat sat on the mat"], padding="max_length",
                                      max_length=TEXT["max_position_embeddings"], truncation=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask[0].sum() < mask[1].sum() < ids.shape[1]
    got = pipe.parts["text_encoder_2"](jnp.asarray(ids), jnp.asarray(mask)).pooler_output
    with torch.no_grad():
        want = pipe.text(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).pooler_output.numpy()
    err, rel = errors(got, want)
    assert err <= 1e-5, f"pooled output: max-abs {err:.3g}, relative {rel:.3g}"


def test_broken_components_are_refused_before_weights(pipe, tmp_path):
    root = tmp_path / "pipe"
    shutil.copytree(pipe.root, root)
    (root / "image_processor" / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"image_processor/preprocessor_config\.json"):
        check_components(root, ["image_processor"])
    shutil.copy(pipe.root / "text_encoder_2" / "config.json", root / "image_encoder" / "config.json")
    with pytest.raises(CheckpointError, match=r"class \['CLIPTextModel'\] is not a image_encoder class"):
        check_components(root, ["image_encoder"])
