"""CLIP text and vision encoders: parity with Transformers (fp32, noised odd tiny configs, padding, batch > 1,
every hidden state, pooled outputs), checkpoint name forms, export, compile discipline, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tests.oracles import add_noise, errors

from fastvideo_jax.configs.models.encoders.clip import (
    CLIP_TEXT_PRESETS,
    CLIP_VISION_PRESETS,
    CLIPTextEncoderConfig,
    clip_text_preset,
)
from fastvideo_jax.errors import UserError
from fastvideo_jax.models.encoders.base import BaseEncoderOutput, ImageEncoder, TextEncoder
from fastvideo_jax.models.encoders.clip import CLIPTextModel
from fastvideo_jax.models.loader.component_loader import (
    ImageEncoderLoader,
    TextEncoderLoader,
    export_component,
)
from fastvideo_jax.models.loader.safetensors_io import CheckpointError, SafetensorsCheckpoint, save_safetensors

TEXT = dict(CLIP_TEXT_PRESETS["tiny"])
VISION = dict(CLIP_VISION_PRESETS["tiny"])
# name -> (Transformers class, its config kwargs, our loader)
MODELS = {
    "text": ("CLIPTextModel", TEXT, TextEncoderLoader),
    "text_proj": ("CLIPTextModelWithProjection", TEXT, TextEncoderLoader),
    "text_legacy_eos": ("CLIPTextModel", {**TEXT, "eos_token_id": 2}, TextEncoderLoader),
    "vision": ("CLIPVisionModel", VISION, ImageEncoderLoader),
    "vision_proj": ("CLIPVisionModelWithProjection", VISION, ImageEncoderLoader),
}
TOL = 1e-5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> SimpleNamespace:
    """Each noised tiny Transformers model saved with save_pretrained, and ours loaded from it."""
    root = tmp_path_factory.mktemp("clip")
    torch_models, dirs, ours = {}, {}, {}
    for i, (name, (cls_name, kwargs, loader)) in enumerate(MODELS.items()):
        config_cls = transformers.CLIPVisionConfig if "vision" in name else transformers.CLIPTextConfig
        torch.manual_seed(i)
        model = add_noise(getattr(transformers, cls_name)(config_cls(**kwargs)).eval(), seed=20 + i)
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        torch_models[name] = model
        ours[name] = loader().load(dirs[name])
    return SimpleNamespace(torch=torch_models, dirs=dirs, ours=ours)


def _text_batch(length=19, valid=(19, 11, 4), seed=0):
    """Tokenizer-like rows: bos, random ids, eos at the row's last valid position, pad (right) after it."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TEXT["bos_token_id"], (len(valid), length)).astype(np.int64)
    mask = (np.arange(length)[None, :] < np.asarray(valid)[:, None]).astype(np.int64)
    ids[:, 0] = TEXT["bos_token_id"]
    ids[np.arange(len(valid)), np.asarray(valid) - 1] = TEXT["eos_token_id"]
    return np.where(mask > 0, ids, TEXT["pad_token_id"]), mask


def _pixels(batch=3, seed=0):
    size = VISION["image_size"]
    return np.random.default_rng(seed).standard_normal((batch, VISION["num_channels"], size, size)).astype(np.float32)


def _torch(model, name, inputs):
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, output_hidden_states=True)
    pooled = getattr(out, "text_embeds", None) if "text" in name else getattr(out, "image_embeds", None)
    pooled = out.pooler_output if pooled is None else pooled
    return out.last_hidden_state.numpy(), tuple(h.numpy() for h in out.hidden_states), pooled.numpy()


def _compare(got: BaseEncoderOutput, want, what: str) -> None:
    last, hidden, pooled = want
    assert len(got.hidden_states) == len(hidden) == 1 + TEXT["num_hidden_layers"], what
    pairs = [("last_hidden_state", got.last_hidden_state, last), ("pooler_output", got.pooler_output, pooled)]
    pairs += [(f"hidden_states[{i}]", g, w) for i, (g, w) in enumerate(zip(got.hidden_states, hidden))]
    for field, g, w in pairs:
        assert g.shape == w.shape, f"{what}: {field} shape {g.shape} vs {w.shape}"
        err, rel = errors(g, w)
        assert err <= TOL, f"{what}: {field} max-abs {err:.3g}, relative {rel:.3g}"


@pytest.mark.parametrize("name", ["text", "text_proj", "text_legacy_eos"])
def test_text_parity(ckpt, name):
    model = ckpt.ours[name]
    assert isinstance(model, TextEncoder)
    ids, mask = _text_batch()
    if name == "text_legacy_eos":  # eos_token_id == 2: pooled at each row's largest id, wherever it falls
        ids = np.random.default_rng(5).integers(3, TEXT["vocab_size"], ids.shape).astype(np.int64)
        assert len(set(ids.argmax(1))) == len(ids), "rows should pool at different positions"
    out = model(jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
    _compare(out, _torch(ckpt.torch[name], name, dict(input_ids=ids, attention_mask=mask)), f"{name} padded")
    np.testing.assert_array_equal(out.attention_mask, mask)
    short, _ = _text_batch(length=13, valid=(13, 9), seed=1)  # no mask: causal only, shorter than the table
    out = model(jnp.asarray(short), output_hidden_states=True)
    _compare(out, _torch(ckpt.torch[name], name, dict(input_ids=short)), f"{name} unmasked L=13")
    assert out.attention_mask is None and model(jnp.asarray(short)).hidden_states is None


def test_text_pools_at_first_eos(ckpt):
    """Two eos in a row: the first one pools (the padding token may equal eos), not the last."""
    ids, mask = _text_batch(valid=(19, 8))
    ids[1, 12] = TEXT["eos_token_id"]
    got = ckpt.ours["text"](jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_array_equal(got.pooler_output[1], got.last_hidden_state[1, 7])
    _compare(ckpt.ours["text"](jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True),
             _torch(ckpt.torch["text"], "text", dict(input_ids=ids, attention_mask=mask)), "two eos")


@pytest.mark.parametrize("name", ["vision", "vision_proj"])
def test_vision_parity(ckpt, name):
    model = ckpt.ours[name]
    assert isinstance(model, ImageEncoder)
    pixels = _pixels()
    out = model(jnp.asarray(pixels), output_hidden_states=True)
    want = _torch(ckpt.torch[name], name, dict(pixel_values=pixels))
    _compare(out, want, name)
    assert out.hidden_states[-2].shape == (3, 1 + (VISION["image_size"] // VISION["patch_size"]) ** 2,
                                           VISION["hidden_size"])
    plain = model(jnp.asarray(pixels))
    assert plain.hidden_states is None and plain.attention_mask is None
    np.testing.assert_array_equal(plain.last_hidden_state, out.last_hidden_state)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    saved = SafetensorsCheckpoint.from_dir(src)
    save_safetensors(dst / "model.safetensors", edit({k: np.array(saved.array(k)) for k in saved}))
    return dst


@pytest.mark.parametrize("name,prefix", [("text", "text_model"), ("vision", "vision_model")])
def test_hub_prefix_and_position_ids_buffer(ckpt, tmp_path, name, prefix):
    """Hub checkpoints (older Transformers) carry ``text_model.``/``vision_model.`` and a position_ids buffer."""
    n = TEXT["max_position_embeddings"] if name == "text" else 1 + (VISION["image_size"] // VISION["patch_size"]) ** 2
    old = _rewrite(ckpt.dirs[name], tmp_path / "old", lambda t: {
        **{f"{prefix}.{k}": v for k, v in t.items()}, f"{prefix}.embeddings.position_ids": np.arange(n)[None]})
    loader = TextEncoderLoader if name == "text" else ImageEncoderLoader
    model = loader().load(old)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(ckpt.ours[name], nnx.Param))):
        np.testing.assert_array_equal(a[...], b[...], err_msg=".".join(map(str, path)))


@pytest.mark.parametrize("name", list(MODELS))
def test_export_gives_transformers_keys(ckpt, name):
    exported = export_component(ckpt.ours[name])
    saved = SafetensorsCheckpoint.from_dir(ckpt.dirs[name])
    assert sorted(exported) == sorted(saved), "export must give exactly the keys Transformers saved"
    for key, arr in exported.items():
        np.testing.assert_array_equal(arr, saved.array(key), err_msg=key)


def test_missing_or_extra_tensor_is_a_clear_error(ckpt, tmp_path):
    from converters import ConversionError

    key = "encoder.layers.2.mlp.fc2.weight"
    broken = _rewrite(ckpt.dirs["vision"], tmp_path / "broken", lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(ConversionError, match=r"encoder\.layers\.mlp\.fc2\.kernel\[layer 2\]"):
        ImageEncoderLoader().load(broken)
    # A projection model's checkpoint declared as the plain tower: the projection has nowhere to go.
    proj = _rewrite(ckpt.dirs["vision_proj"], tmp_path / "proj", lambda t: t)
    raw = json.loads((proj / "config.json").read_text())
    (proj / "config.json").write_text(json.dumps({**raw, "architectures": ["CLIPVisionModel"]}))
    with pytest.raises(ConversionError, match="visual_projection"):
        ImageEncoderLoader().load(proj)


def test_loaders_refuse_the_other_kind(ckpt):
    with pytest.raises(CheckpointError, match=r"CLIPVisionModel.*not a component of this kind"):
        TextEncoderLoader().load(ckpt.dirs["vision"])
    with pytest.raises(CheckpointError, match=r"CLIPTextModel.*not a component of this kind"):
        ImageEncoderLoader().load(ckpt.dirs["text"])


def test_second_eager_call_does_not_compile(ckpt, count_compiles):
    text, vision = ckpt.ours["text"], ckpt.ours["vision_proj"]
    ids, mask = _text_batch(seed=7)
    first = (text(jnp.asarray(ids), jnp.asarray(mask)), vision(jnp.asarray(_pixels(seed=1)), output_hidden_states=True))
    ids2 = np.where(mask > 0, (ids + 1) % TEXT["bos_token_id"], ids)
    with count_compiles() as compiles:
        second = (text(jnp.asarray(ids2), jnp.asarray(mask)),
                  vision(jnp.asarray(_pixels(seed=2)), output_hidden_states=True))
    assert compiles[0] == 0, f"second eager calls with the same shapes compiled {compiles[0]} times"
    assert not np.array_equal(first[0].last_hidden_state, second[0].last_hidden_state)
    assert not np.array_equal(first[1].hidden_states[-2], second[1].hidden_states[-2])


def test_bad_inputs_are_user_errors(ckpt):
    with pytest.raises(UserError, match=r"pixel_values must be \(batch, 3, 30, 30\), got \(1, 3, 32, 32\)"):
        ckpt.ours["vision"](jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(UserError, match=r"input_ids must be \(batch, length <= 19\), got \(1, 20\)"):
        ckpt.ours["text"](jnp.zeros((1, 20), jnp.int32))
    with pytest.raises(UserError, match=r"attention_mask \(1, 5\) must have input_ids' shape \(1, 6\)"):
        ckpt.ours["text"](jnp.zeros((1, 6), jnp.int32), jnp.ones((1, 5), jnp.int32))
    with pytest.raises(UserError, match=r"CLIPTextModel does not support attention backend 'cudnn'"):
        CLIPTextModel(CLIPTextEncoderConfig(arch_config=clip_text_preset("tiny"), attention_backend="cudnn"),
                      rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ["text_proj", "vision_proj"])
def test_random_checkpoint_of_ours_loads_in_transformers(tmp_path, name):
    """Our export (reverse mapping) and config.json, as ``testing.write_random_component`` writes them for a tiny
    pipeline, are a checkpoint Transformers loads with no missing or unexpected key, and computes as we do."""
    from fastvideo_jax.models.encoders import clip as ours_module
    from fastvideo_jax.testing.tiny_checkpoints import write_random_component

    cls_name, kwargs, loader = MODELS[name]
    model_type = "clip_vision_model" if "vision" in name else "clip_text_model"
    write_random_component(tmp_path, getattr(ours_module, cls_name), cls_name, kwargs, weights_name="model.safetensors",
                           seed=5, extra_config={"model_type": model_type})
    ref, info = getattr(transformers, cls_name).from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    inputs = dict(pixel_values=_pixels(2, seed=6)) if "vision" in name else dict(zip(("input_ids", "attention_mask"),
                                                                                     _text_batch(valid=(19, 7))))
    got = loader().load(tmp_path)(*(jnp.asarray(v) for v in inputs.values()), output_hidden_states=True)
    _compare(got, _torch(ref.eval(), name, inputs), f"{name} written by us")


def test_sharded_load_matches(ckpt):
    from jax.sharding import PartitionSpec

    from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
    model = ImageEncoderLoader().load(ckpt.dirs["vision_proj"], mesh=mesh)
    fc1 = model.encoder.layers.mlp.fc1.kernel[...]  # (layers, embed 24, mlp 37): embed over fsdp, 37 not over 4
    assert fc1.sharding.spec == PartitionSpec(None, "fsdp", None), fc1.sharding.spec
    pixels = jnp.asarray(_pixels(seed=8))
    got = model(pixels, output_hidden_states=True)
    want = ckpt.ours["vision_proj"](pixels, output_hidden_states=True)
    for field in ("last_hidden_state", "pooler_output"):
        err, rel = errors(getattr(got, field), getattr(want, field))
        assert err <= TOL, f"sharded vs one device, {field}: max-abs {err:.3g}, relative {rel:.3g}"


@pytest.mark.parametrize("name", ["text", "vision_proj"])
def test_fp32_runs_every_matmul_at_highest_precision(ckpt, matmul_precisions, name):
    model = ckpt.ours[name]
    args = (jnp.asarray(_pixels(seed=9)),) if "vision" in name else tuple(jnp.asarray(a) for a in _text_batch())
    found = matmul_precisions(model, *args)
    # Per layer: q, k, v, two attention einsums, out, fc1, fc2 (scanned: traced once); patch embed / projection.
    assert len(found) >= 8 and set(found) == {"HIGHEST"}, f"{len(found)} matmuls at {set(found)}"
