"""LLaMA text encoder (HunyuanVideo's ``text_encoder``): parity with Transformers' ``LlamaModel`` (fp32, noised odd
tiny config with grouped KV heads, padding, batch > 1, every hidden state), the ``LlamaForCausalLM`` form, export,
compile discipline, config errors, bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tests.oracles import add_noise, errors

from fastvideo_jax.configs.models.encoders.llama import LLAMA_PRESETS, LlamaArchConfig, LlamaEncoderConfig, llama_preset
from fastvideo_jax.errors import UserError
from fastvideo_jax.models.encoders.base import BaseEncoderOutput, TextEncoder
from fastvideo_jax.models.encoders.llama import LlamaModel
from fastvideo_jax.models.loader.component_loader import TextEncoderLoader, export_component
from fastvideo_jax.models.loader.safetensors_io import SafetensorsCheckpoint

TINY = dict(LLAMA_PRESETS["tiny"])
TOL = 1e-5


def _torch_llama(cls_name: str, seed: int, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    return add_noise(getattr(transformers, cls_name)(config).eval(), seed=seed + 10)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> SimpleNamespace:
    """The noised tiny Transformers LlamaModel saved with save_pretrained, and ours loaded from it in fp32."""
    root = tmp_path_factory.mktemp("llama")
    ref = _torch_llama("LlamaModel", seed=0)
    ref.save_pretrained(root / "llama")
    ours = TextEncoderLoader().load(root / "llama", precision="fp32")
    return SimpleNamespace(torch=ref, dir=root / "llama", ours=ours)


def _batch(length=13, valid=(13, 8, 3), seed=0):
    """Right-padded rows (as Hunyuan's tokenizer pads): bos, random ids, pad after each row's valid tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY["vocab_size"], (len(valid), length)).astype(np.int64)
    ids[:, 0] = TINY["bos_token_id"]
    mask = (np.arange(length)[None, :] < np.asarray(valid)[:, None]).astype(np.int64)
    return np.where(mask > 0, ids, TINY["pad_token_id"]), mask


def _torch(model, **inputs):
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, output_hidden_states=True)
    return out.last_hidden_state.numpy(), tuple(h.numpy() for h in out.hidden_states)


def _compare(got: BaseEncoderOutput, want, what: str, rows=None) -> None:
    """Every hidden state within TOL; ``rows``: (B, L) bool of the positions compared (None: all)."""
    last, hidden = want
    assert len(got.hidden_states) == len(hidden) == 1 + TINY["num_hidden_layers"], what
    pairs = [("last_hidden_state", got.last_hidden_state, last)]
    pairs += [(f"hidden_states[{i}]", g, w) for i, (g, w) in enumerate(zip(got.hidden_states, hidden))]
    for field, g, w in pairs:
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, f"{what}: {field} shape {g.shape} vs {w.shape}"
        if rows is not None:
            g, w = g[rows], w[rows]
        err, rel = errors(g, w)
        assert err <= TOL, f"{what}: {field} max-abs {err:.3g}, relative {rel:.3g}"


def test_config_is_grouped_and_odd():
    cfg = llama_preset("tiny")
    assert cfg.kv_heads < cfg.num_attention_heads and cfg.head_size * cfg.num_attention_heads != cfg.hidden_size
    assert cfg.rope_base == 500000.0 and cfg.rope_type == "default"


def test_parity_padded_batch(ckpt):
    model = ckpt.ours
    assert isinstance(model, TextEncoder) and isinstance(model, LlamaModel)
    assert model.embed_tokens.embedding[...].dtype == jnp.float32
    ids, mask = _batch()
    out = model(jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
    _compare(out, _torch(ckpt.torch, input_ids=ids, attention_mask=mask), "right-padded")
    np.testing.assert_array_equal(out.attention_mask, mask)
    np.testing.assert_array_equal(out.hidden_states[-1], out.last_hidden_state)
    plain = model(jnp.asarray(ids), jnp.asarray(mask))
    assert plain.hidden_states is None
    np.testing.assert_array_equal(plain.last_hidden_state, out.last_hidden_state)


def test_parity_without_mask_and_left_padding(ckpt):
    ids, _ = _batch(length=11, valid=(11, 11), seed=1)
    out = ckpt.ours(jnp.asarray(ids), output_hidden_states=True)
    _compare(out, _torch(ckpt.torch, input_ids=ids), "no mask")
    assert out.attention_mask is None
    # Left padding: the pads' own outputs are arbitrary (their rows attend to nothing), the tokens' are compared.
    ids, mask = _batch(length=11, valid=(11, 6), seed=2)
    ids, mask = ids[:, ::-1].copy(), mask[:, ::-1].copy()
    out = ckpt.ours(jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
    _compare(out, _torch(ckpt.torch, input_ids=ids, attention_mask=mask), "left-padded", rows=mask > 0)


def test_padding_changes_nothing_before_it(ckpt):
    """A row's valid tokens give the same states whatever the padded positions hold (the mask hides them)."""
    ids, mask = _batch(valid=(13, 5), seed=3)
    other = np.where(mask > 0, ids, 7)
    a = ckpt.ours(jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state
    b = ckpt.ours(jnp.asarray(other), jnp.asarray(mask)).last_hidden_state
    np.testing.assert_array_equal(np.asarray(a)[mask > 0], np.asarray(b)[mask > 0])


def test_causal_lm_checkpoint_loads_as_the_stack(tmp_path):
    """A ``LlamaForCausalLM`` checkpoint (``model.`` prefix, ``lm_head``) loads; its stack computes as Transformers'."""
    ref = _torch_llama("LlamaForCausalLM", seed=3)
    ref.save_pretrained(tmp_path)
    saved = SafetensorsCheckpoint.from_dir(tmp_path)
    assert "lm_head.weight" in saved and "model.norm.weight" in saved
    ours = TextEncoderLoader().load(tmp_path, precision="fp32")
    ids, mask = _batch(seed=4)
    _compare(ours(jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True),
             _torch(ref.model, input_ids=ids, attention_mask=mask), "LlamaForCausalLM")


def test_export_gives_transformers_keys(ckpt):
    exported = export_component(ckpt.ours)
    saved = SafetensorsCheckpoint.from_dir(ckpt.dir)
    assert sorted(exported) == sorted(saved), "export must give exactly the keys Transformers saved"
    for key, arr in exported.items():
        np.testing.assert_array_equal(arr, saved.array(key), err_msg=key)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_no_worse_than_transformers(ckpt, precision):
    """fp16 is the default (as HunyuanVideo ships and runs the encoder), bf16 the knob's other choice: against
    the fp32 model, our half-precision run errs no more than 1.5x Transformers' at the same dtype (both round
    weights and activations to a 10- / 7-bit mantissa; the reduction orders differ), on the skip-layer state."""
    model = TextEncoderLoader().load(ckpt.dir, **({} if precision == "fp16" else {"precision": precision}))
    dtype = {"fp16": jnp.float16, "bf16": jnp.bfloat16}[precision]
    assert model.embed_tokens.embedding[...].dtype == dtype
    assert model.layers.self_attn.k_proj.kernel[...].dtype == dtype
    ids, mask = _batch(seed=5)
    got = model(jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True).hidden_states[-3]
    assert got.dtype == dtype
    want = ckpt.ours(jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True).hidden_states[-3]
    half = transformers.LlamaModel.from_pretrained(ckpt.dir, dtype={"fp16": torch.float16,
                                                                     "bf16": torch.bfloat16}[precision]).eval()
    with torch.no_grad():
        theirs = half(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                      output_hidden_states=True).hidden_states[-3].float().numpy()
    valid = mask > 0
    ours_err, rel = errors(np.asarray(got.astype(jnp.float32))[valid], np.asarray(want)[valid])
    theirs_err, _ = errors(theirs[valid], np.asarray(want)[valid])
    assert 0 < ours_err <= 1.5 * theirs_err, (f"{precision}: ours {ours_err:.3g} (relative {rel:.3g}) vs "
                                              f"Transformers' {theirs_err:.3g}")


def test_second_eager_call_does_not_compile(ckpt, count_compiles):
    ids, mask = _batch(seed=6)
    first = ckpt.ours(jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
    ids2 = np.where(mask > 0, (ids + 1) % TINY["vocab_size"], ids)
    with count_compiles() as compiles:
        second = ckpt.ours(jnp.asarray(ids2), jnp.asarray(mask), output_hidden_states=True)
    assert compiles[0] == 0, f"a second eager call with the same shapes compiled {compiles[0]} times"
    assert not np.array_equal(first.hidden_states[-3], second.hidden_states[-3])


def test_fp32_runs_every_matmul_at_highest_precision(ckpt, matmul_precisions):
    found = matmul_precisions(ckpt.ours, *(jnp.asarray(a) for a in _batch()))
    # Per layer (scanned: traced once): q, k, v, two attention einsums, o, gate, up, down.
    assert len(found) >= 9 and set(found) == {"HIGHEST"}, f"{len(found)} matmuls at {set(found)}"


@pytest.mark.parametrize("mesh_kwargs", [dict(fsdp=4, tensor=2), dict(data=2, sequence=4)], ids=["fsdp4xtp2",
                                                                                           "data2xsp4"])
def test_sharded_load_matches(ckpt, mesh_kwargs):
    """Loaded on 8 devices: weights split (KV heads over tensor), work split (queries over sequence), same states."""
    from jax.sharding import PartitionSpec

    from fastvideo_jax.parallel.activations import mesh_scope
    from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(**mesh_kwargs))
    model = TextEncoderLoader().load(ckpt.dir, mesh=mesh, precision="fp32")
    k = model.layers.self_attn.k_proj.kernel[...]  # (layers, embed 30, kv_heads 2 * 8)
    if "tensor" in mesh_kwargs:
        assert k.sharding.spec == PartitionSpec(None, None, "tensor"), k.sharding.spec
    else:
        assert not k.sharding.is_fully_replicated, k.sharding.spec
    ids, mask = (jnp.asarray(a) for a in _batch(length=16, valid=(16, 8, 3, 9), seed=7))
    with mesh_scope(mesh):  # as the prompt path runs it (the mesh the weights live on)
        got = model(ids, mask, output_hidden_states=True)
    want = ckpt.ours(ids, mask, output_hidden_states=True)
    assert not got.last_hidden_state.sharding.is_fully_replicated, "the encoder's work was not split"
    for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states)):
        err, rel = errors(g, w)
        assert err <= TOL, f"sharded vs one device, hidden_states[{i}]: max-abs {err:.3g}, relative {rel:.3g}"


def test_bad_inputs_are_user_errors(ckpt):
    with pytest.raises(UserError, match=r"input_ids must be \(batch, length\), got \(5,\)"):
        ckpt.ours(jnp.zeros((5,), jnp.int32))
    with pytest.raises(UserError, match=r"attention_mask \(1, 5\) must have input_ids' shape \(1, 6\)"):
        ckpt.ours(jnp.zeros((1, 6), jnp.int32), jnp.ones((1, 5), jnp.int32))
    with pytest.raises(UserError, match=r"LlamaModel does not support attention backend 'cudnn'"):
        LlamaModel(LlamaEncoderConfig(arch_config=llama_preset("tiny"), attention_backend="cudnn"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("bad,match", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "not a multiple of num_key_value_heads=4"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_type 'llama3' is not implemented"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope_type 'yarn' is not implemented"),
    (dict(hidden_act="tanh"), "hidden_act 'tanh' unsupported"),
    (dict(head_dim=7), "head_dim=7 must be even"),
])
def test_config_errors_are_specific(bad, match):
    with pytest.raises(ValueError, match=match):
        LlamaArchConfig().update_model_arch({**TINY, **bad})


def test_rope_parameters_form_reads_theta(ckpt):
    """Transformers 5 writes ``rope_parameters``; hub checkpoints write ``rope_theta``: both give the same theta."""
    raw = json.loads((ckpt.dir / "config.json").read_text())
    assert "rope_parameters" in raw
    assert LlamaArchConfig().update_model_arch(raw).rope_base == TINY["rope_theta"]
    legacy = {**LLAMA_PRESETS["llava-llama-3-8b"]}
    assert LlamaArchConfig().update_model_arch(legacy).rope_base == 500000.0


def test_random_checkpoint_of_ours_loads_in_transformers(tmp_path):
    """Our export and config.json (``testing.write_random_llama``, for tiny pipelines) are a checkpoint
    Transformers loads with no missing or unexpected key, and computes as we do."""
    from fastvideo_jax.testing.tiny_checkpoints import write_random_llama

    write_random_llama(tmp_path, seed=5)
    ref, info = transformers.LlamaModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert ref.config.num_key_value_heads == TINY["num_key_value_heads"] and ref.config.head_dim == TINY["head_dim"]
    ids, mask = _batch(seed=8)
    got = TextEncoderLoader().load(tmp_path, precision="fp32")(jnp.asarray(ids), jnp.asarray(mask),
                                                               output_hidden_states=True)
    _compare(got, _torch(ref.eval(), input_ids=ids, attention_mask=mask), "written by us")
