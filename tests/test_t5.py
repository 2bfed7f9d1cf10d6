"""T5 / UMT5 text encoders: parity with Transformers, Wan prompt encoding, tokenizer, export, loader errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tests.oracles import add_noise, errors
from transformers import AutoTokenizer
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel as HFT5EncoderModel
from transformers import UMT5Config as HFUMT5Config
from transformers import UMT5EncoderModel as HFUMT5EncoderModel

from converters import ConversionError
from fastvideo_jax.configs.models.encoders.t5 import T5_PRESETS, UMT5EncoderConfig, t5_preset
from fastvideo_jax.errors import UserError
from fastvideo_jax.models.encoders.base import BaseEncoderOutput
from fastvideo_jax.models.encoders.t5 import UMT5EncoderModel, relative_position_buckets
from fastvideo_jax.models.encoders.text import encode_prompts
from fastvideo_jax.models.loader.component_loader import (
    TextEncoderLoader,
    TokenizerLoader,
    build_abstract,
    export_component,
    leaf_specs,
)
from fastvideo_jax.models.loader.safetensors_io import CheckpointError, SafetensorsCheckpoint, save_safetensors
from fastvideo_jax.models.registry import UnknownModelError
from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh

TINY = dict(T5_PRESETS["tiny"])
KINDS = {"umt5": (HFUMT5Config, HFUMT5EncoderModel), "t5": (HFT5Config, HFT5EncoderModel)}
CORPUS = [
    "a cat sits on a red mat in the warm sun",
    "two dogs run along the beach at sunset",
    "a slow camera pan over snowy mountains",
    "the city at night, neon lights and rain on the street",
    "a small boat drifts on a calm blue lake",
]


def _tiny_tokenizer():
    """A T5-style Unigram tokenizer (<pad>=0, </s>=1, <unk>=2) trained in code, wrapped as T5Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=100, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(CORPUS, trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    return T5Tokenizer(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> SimpleNamespace:
    """Noised tiny Transformers encoders in ``<root>/<kind>/text_encoder``, a tokenizer in ``<root>/tokenizer``."""
    root = tmp_path_factory.mktemp("t5")
    torch_models, dirs = {}, {}
    for i, (kind, (config_cls, model_cls)) in enumerate(KINDS.items()):
        torch.manual_seed(i)
        model = add_noise(model_cls(config_cls(**TINY)).eval(), seed=10 + i)
        dirs[kind] = root / kind / "text_encoder"
        model.save_pretrained(dirs[kind])
        torch_models[kind] = model
    tokenizer = _tiny_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    return SimpleNamespace(root=root, dirs=dirs, torch=torch_models, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def ours(ckpt) -> dict[str, nnx.Module]:
    return {kind: TextEncoderLoader().load(d) for kind, d in ckpt.dirs.items()}


def _run(model: nnx.Module, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids), None if mask is None else jnp.asarray(mask)).last_hidden_state)


def _torch_run(model, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    with torch.no_grad():
        m = None if mask is None else torch.from_numpy(mask)
        return model(input_ids=torch.from_numpy(ids), attention_mask=m).last_hidden_state.float().numpy()


def _batch(length: int = 37, valid=(37, 20, 5), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids (B, L) and a right-padding mask with a different true length per row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY["vocab_size"], (len(valid), length)).astype(np.int64)
    mask = (np.arange(length)[None, :] < np.asarray(valid)[:, None]).astype(np.int64)
    return np.where(mask > 0, ids, 0), mask


@pytest.mark.parametrize("kind", list(KINDS))
def test_parity_with_padding_mask(ckpt, ours, kind):
    ids, mask = _batch()
    got, ref = _run(ours[kind], ids, mask), _torch_run(ckpt.torch[kind], ids, mask)
    err, rel = errors(got, ref)  # all positions, padded ones included: they attend to the valid keys only
    assert err < 1e-5, f"{kind}: last_hidden_state max-abs {err:.3g}, relative {rel:.3g}"
    ids, _ = _batch(length=13, valid=(13, 13))
    err, rel = errors(_run(ours[kind], ids, None), _torch_run(ckpt.torch[kind], ids, None))
    assert err < 1e-5, f"{kind} (no mask, L=13): max-abs {err:.3g}, relative {rel:.3g}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_output_and_hidden_states_match_transformers(ckpt, ours, kind):
    """The BaseEncoderOutput contract: hidden_states as Transformers collects them (embeddings, blocks 1..N-1,
    the final normed state), the mask given back, no pooled output."""
    ids, mask = _batch(length=13, valid=(13, 6))
    out = ours[kind](jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
    assert isinstance(out, BaseEncoderOutput) and out.pooler_output is None
    np.testing.assert_array_equal(out.attention_mask, mask)
    with torch.no_grad():
        ref = ckpt.torch[kind](input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                               output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == TINY["num_layers"] + 1
    for i, (got, want) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        err, rel = errors(got, want.numpy())
        assert err < 1e-5, f"{kind}: hidden_states[{i}] max-abs {err:.3g}, relative {rel:.3g}"
    np.testing.assert_array_equal(out.hidden_states[-1], out.last_hidden_state)
    assert ours[kind](jnp.asarray(ids)).hidden_states is None


def test_unsupported_attention_backend_is_refused():
    with pytest.raises(UserError, match=r"UMT5EncoderModel does not support attention backend 'cudnn'; it supports .*'reference'"):
        UMT5EncoderModel(UMT5EncoderConfig(arch_config=t5_preset("tiny"), attention_backend="cudnn"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("buckets,max_distance", [(8, 16), (32, 128)])
def test_relative_buckets_match_transformers(buckets, max_distance):
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    cfg = HFUMT5Config(**{**TINY, "relative_attention_num_buckets": buckets,
                          "relative_attention_max_distance": max_distance})
    attn = UMT5Attention(cfg, has_relative_attention_bias=True)
    length = 700  # offsets up to +-699, past max_distance, including the power-of-two bucket edges
    ref = attn._relative_position_bucket(torch.arange(-(length - 1), length)).numpy()
    np.testing.assert_array_equal(relative_position_buckets(length, buckets, max_distance), ref)


def test_bf16(ckpt):
    """bf16 against the fp32 reference, bounded by Transformers' own bf16 error on the same weights and inputs.

    bf16 rounding (8 mantissa bits) is amplified by T5's unscaled attention logits, so the error is ~2e-2 of
    max|ref| for both implementations; we only require ours to stay within twice the reference's bf16 error.
    """
    model = TextEncoderLoader().load(ckpt.dirs["umt5"], precision="bf16")
    assert model.encoder.block.layer[0].SelfAttention.q.kernel[...].dtype == jnp.bfloat16
    ids, mask = _batch()
    got = _run(model, ids, mask)
    assert got.dtype == jnp.bfloat16
    ref = _torch_run(ckpt.torch["umt5"], ids, mask)
    ref_bf16 = _torch_run(HFUMT5EncoderModel.from_pretrained(ckpt.dirs["umt5"], dtype=torch.bfloat16).eval(), ids, mask)
    err, rel = errors(got.astype(np.float32), ref)
    _, rel_torch = errors(ref_bf16, ref)
    assert rel < 2 * rel_torch, f"bf16: max-abs {err:.3g}, relative {rel:.3g} (Transformers bf16: {rel_torch:.3g})"


def test_encode_prompts_matches_diffusers_wan(ckpt, ours):
    """Wan's 512-token path. The oracle is diffusers' code run in float64. Over 512 positions fp32 rounding alone
    puts Transformers' own fp32 run 5.1-5.7e-6 from it and ours 5.5-9.9e-6 (measured across runs; every
    primitive's error is of PyTorch's order, e.g. tests/test_layers.py), so the bound is 2e-5 and at most
    twice Transformers' own fp32 error. The 1e-5 parity at short lengths is test_parity_fp32."""
    import copy

    from diffusers import WanPipeline

    prompts = [
        "a cat sits on a red mat",
        "  two dogs   run &amp; play\n along the beach at sunset ",
        "a slow camera pan " * 200,  # longer than text_len: truncated, </s> kept
    ]

    def reference(model, dtype):
        pipe = SimpleNamespace(tokenizer=ckpt.tokenizer, text_encoder=model, _execution_device="cpu")
        with torch.no_grad():
            return WanPipeline._get_t5_prompt_embeds(
                pipe, prompt=prompts, max_sequence_length=512, device=torch.device("cpu"), dtype=dtype
            ).double().numpy()

    exact = reference(copy.deepcopy(ckpt.torch["umt5"]).double(), torch.float64)
    torch_fp32 = reference(ckpt.torch["umt5"], torch.float32)
    tokenizer = TokenizerLoader().load(ckpt.root / "tokenizer")
    embeds, mask = encode_prompts(tokenizer, ours["umt5"], prompts)  # text_len=512, as Wan
    assert embeds.shape == exact.shape == (3, 512, TINY["d_model"])
    lens = np.asarray(mask).sum(1)
    assert lens[0] < lens[1] < lens[2] == 512, lens
    assert not np.asarray(embeds)[0, lens[0]:].any(), "positions after the prompt must be exactly zero"
    err, rel = errors(embeds, exact)
    torch_err, _ = errors(torch_fp32, exact)
    assert err < 2e-5 and err <= 2 * torch_err, (
        f"encode_prompts vs WanPipeline._get_t5_prompt_embeds (float64): max-abs {err:.3g}, relative {rel:.3g}; "
        f"Transformers fp32 vs float64: {torch_err:.3g}"
    )


def test_tokenizer_loader_matches_autotokenizer(ckpt):
    directory = ckpt.root / "tokenizer"
    ours, ref = TokenizerLoader().load(directory), AutoTokenizer.from_pretrained(str(directory))
    assert type(ours).__name__ == "T5Tokenizer" and ours.pad_token_id == 0 and ours.eos_token_id == 1
    prompts = ["a cat on a mat", "neon lights and rain, zebra!", ""]
    kw = dict(padding="max_length", max_length=19, truncation=True, add_special_tokens=True)
    got, want = ours(prompts, **kw), ref(prompts, **kw)
    assert got["input_ids"] == want["input_ids"] == ckpt.tokenizer(prompts, **kw)["input_ids"]
    assert got["attention_mask"] == want["attention_mask"]
    assert all(row[sum(m) - 1] == 1 for row, m in zip(got["input_ids"], got["attention_mask"])), "ends with </s>"


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_round_trip(ckpt, ours, kind, tmp_path):
    exported = export_component(ours[kind])
    saved = SafetensorsCheckpoint.from_dir(ckpt.dirs[kind])
    assert sorted(exported) == sorted(saved), "export must give exactly the keys Transformers saved"
    for key, arr in exported.items():
        np.testing.assert_array_equal(arr, saved.array(key), err_msg=key)
    shutil.copy(ckpt.dirs[kind] / "config.json", tmp_path / "config.json")
    save_safetensors(tmp_path / "model.safetensors", exported)
    ids, mask = _batch(length=11, valid=(11, 4))
    np.testing.assert_array_equal(_run(TextEncoderLoader().load(tmp_path), ids, mask), _run(ours[kind], ids, mask))


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a checkpoint dir with its tensors passed through ``edit(dict) -> dict``."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    saved = SafetensorsCheckpoint.from_dir(src)
    save_safetensors(dst / "model.safetensors", edit({k: np.array(saved.array(k)) for k in saved}))
    return dst


def test_tied_embedding_names(ckpt, ours, tmp_path):
    src = ckpt.dirs["t5"]
    renamed = {"shared.weight": "encoder.embed_tokens.weight"}
    alias = _rewrite(src, tmp_path / "alias", lambda t: {renamed.get(k, k): v for k, v in t.items()})
    model = TextEncoderLoader().load(alias)
    np.testing.assert_array_equal(model.shared.embedding[...], ours["t5"].shared.embedding[...])
    # Both names (a tied copy saved twice): the copy is dropped, as Transformers' weight tying does.
    both = _rewrite(src, tmp_path / "both", lambda t: {**t, "encoder.embed_tokens.weight": t["shared.weight"]})
    model = TextEncoderLoader().load(both)
    np.testing.assert_array_equal(model.shared.embedding[...], ours["t5"].shared.embedding[...])
    # Any other second tensor for the same parameter is still refused.
    dup = _rewrite(src, tmp_path / "dup", lambda t: {**t, "shared.weight_copy": t["shared.weight"]})
    with pytest.raises(ConversionError, match="unexpected"):
        TextEncoderLoader().load(dup)


def test_missing_key_is_a_clear_error(ckpt, tmp_path):
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    broken = _rewrite(ckpt.dirs["umt5"], tmp_path / "broken", lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(ConversionError, match=r"does not fill[\s\S]*encoder\.block\.layer\.1\.DenseReluDense\.wo"
                                              r"\.kernel\[layer 1\]"):
        TextEncoderLoader().load(broken)
    # T5 keeps one bias table; a second one (UMT5-style, in block 1) has nowhere to go.
    extra = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
    bias = _rewrite(ckpt.dirs["t5"], tmp_path / "extra", lambda t: {
        **t, extra: t["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]})
    with pytest.raises(ConversionError, match="unexpected checkpoint tensors"):
        TextEncoderLoader().load(bias)


def test_unknown_architecture_is_a_clear_error(ckpt, tmp_path):
    bad = _rewrite(ckpt.dirs["umt5"], tmp_path / "made_up", lambda t: t)
    raw = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**raw, "architectures": ["MadeUpEncoderModel"]}))
    with pytest.raises((CheckpointError, UnknownModelError), match="MadeUpEncoderModel"):
        TextEncoderLoader().load(bad)


def test_sharded_load_matches(ckpt, ours):
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
    model = TextEncoderLoader().load(ckpt.dirs["umt5"], mesh=mesh)
    q = model.encoder.block.layer[0].SelfAttention.q.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), q.sharding.spec
    assert model.shared.embedding[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    ids, mask = _batch()
    err, rel = errors(_run(model, ids, mask), _run(ours["umt5"], ids, mask))
    assert err < 1e-5, f"sharded vs single-device: max-abs {err:.3g}, relative {rel:.3g}"


def test_layout_and_umt5_xxl_size():
    """Logical axes on every parameter; stacked bias for UMT5, one unstacked table for T5; XXL builds abstractly."""
    from fastvideo_jax.configs.models.encoders.t5 import T5EncoderConfig
    from fastvideo_jax.models.encoders.t5 import T5EncoderModel

    for cls, cfg in [(UMT5EncoderModel, UMT5EncoderConfig(arch_config=t5_preset("tiny"))),
                     (T5EncoderModel, T5EncoderConfig(arch_config=t5_preset("tiny", umt5=False)))]:
        _, state = build_abstract(cls, cfg)
        for path, var in nnx.to_flat_state(state):
            axes = var.get_metadata().get("out_sharding")
            assert axes is not None and len(axes) == len(var.shape), (path, axes)
        specs = {".".join(map(str, p)): s for p, s in leaf_specs(state).items()}
        stacked = "encoder.block.layer.0.SelfAttention.relative_attention_bias.embedding"
        if cls is UMT5EncoderModel:
            assert specs[stacked].stacked and specs[stacked].shape == (2, 8, 4)
        else:
            assert stacked not in specs and specs["encoder.relative_attention_bias.embedding"].shape == (8, 4)
    _, state = build_abstract(UMT5EncoderModel, UMT5EncoderConfig(arch_config=t5_preset("umt5-xxl")))
    total = sum(int(np.prod(s.shape)) for s in leaf_specs(state).values())
    assert total == 5_680_910_336, total  # UMT5-XXL encoder: 5.68B parameters


def test_second_eager_call_does_not_compile(ours, count_compiles):
    model = ours["umt5"]
    ids, mask = _batch(seed=3)
    ids2 = (ids + 1) % TINY["vocab_size"]
    args1, args2 = (jnp.asarray(ids), jnp.asarray(mask)), (jnp.asarray(ids2), jnp.asarray(mask))
    first = np.asarray(model(*args1).last_hidden_state)
    with count_compiles() as compiles:
        second = np.asarray(model(*args2).last_hidden_state)
    assert compiles[0] == 0, f"a second eager call with the same shapes compiled {compiles[0]} times"
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("knob,expect", [(None, "HIGHEST"), ("default", "DEFAULT")])
def test_matmul_precision_knob_reaches_every_matmul(ckpt, matmul_precisions, knob, expect):
    model = TextEncoderLoader().load(ckpt.dirs["umt5"], matmul_precision=knob)
    ids, mask = _batch(seed=4)
    found = matmul_precisions(model, jnp.asarray(ids), jnp.asarray(mask))
    names = set(found)
    assert len(found) >= 8 and names == {expect}, f"{len(found)} matmuls at {names}, expected {expect}"
