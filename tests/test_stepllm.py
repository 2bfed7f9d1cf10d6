"""Step-LLM text encoder (StepVideo's ``step_llm``): parity with diffsynth 1.1.9's ``Step1Model`` whose closed
attention kernel is replaced by causal square-root ALiBi (see fastvideo_jax/models/encoders/stepllm.py for the
sources), fp32, noised odd tiny config (3 KV groups, 6 heads: a non-power-of-two slope set), right padding, every
hidden state; the positional scheme matters; export; compile discipline; sharded load; bad input."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file
from tests.oracles import errors
from tests.stepvideo_oracle import diffsynth_module

from fastvideo_jax.configs.models.encoders.stepllm import STEPLLM_PRESETS, StepLLMArchConfig, StepLLMEncoderConfig
from fastvideo_jax.configs.models.encoders.stepllm import stepllm_preset
from fastvideo_jax.errors import UserError
from fastvideo_jax.models.encoders.base import TextEncoder
from fastvideo_jax.models.encoders.stepllm import Step1Model, alibi_slopes
from fastvideo_jax.models.loader.component_loader import TextEncoderLoader, export_component

TINY = dict(STEPLLM_PRESETS["tiny"])
TOL = 1e-5


def _oracle_config(**arch):
    from transformers import PretrainedConfig

    return PretrainedConfig(**{**dict(params_dtype=torch.float32, fp32_residual_connection=False,
                                      embedding_weights_in_fp32=False, hidden_dropout=0.0, attention_dropout=0.0,
                                      use_flash_attn=True), **arch})


def sqrt_alibi_flash_attn(q, k, v, dropout_p=0.0, softmax_scale=None, causal=True, **_):
    """The established semantics of ``Optimus.fwd`` as Step-Audio's ``modeling_step1.py`` falls back to it:
    ``build_alibi_cache`` (square-root distances, ALiBi slopes, causal -inf) added to the scaled logits."""
    b, s, h, d = q.shape
    n = 2 ** math.floor(math.log2(h))
    slopes = torch.pow(2.0 ** (-8.0 / n), torch.arange(1, n + 1))
    if n < h:
        slopes = torch.cat([slopes, torch.pow(2.0 ** (-4.0 / n), torch.arange(1, 1 + 2 * (h - n), 2))])
    rows, cols = torch.arange(s).view(1, -1), torch.arange(s).view(-1, 1)
    bias = -torch.sqrt((cols - rows).float()).view(1, s, s) * slopes.view(-1, 1, 1)
    bias = bias.masked_fill(torch.tril(torch.ones(1, s, s)) == 0, float("-inf"))
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=bias.to(q.dtype), scale=scale)
    return out.transpose(1, 2)


@pytest.fixture(scope="module")
def oracle():
    return diffsynth_module("stepvideo_text_encoder")


@pytest.fixture(scope="module")
def ckpt(oracle, tmp_path_factory) -> SimpleNamespace:
    """diffsynth's Step1Model at the tiny config, every parameter drawn (its init is empty), saved as the release
    saves it (safetensors + config.json naming ``Step1Model``), and ours loaded from it in fp32."""
    root = tmp_path_factory.mktemp("stepllm")
    ref = oracle.Step1Model(_oracle_config(**TINY)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            scale = 1.0 if "embeddings" in name else 0.08  # activations O(1), as a trained model keeps them
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else scale * noise)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"architectures": ["Step1Model"], **TINY}))
    ours = TextEncoderLoader().load(root, precision="fp32")
    return SimpleNamespace(torch=ref, dir=root, ours=ours)


def _batch(length=17, valid=(17, 9, 4), seed=0):
    """As the wrapped StepChat tokenizer makes them: BOS, ids, EOS, then pads (EOS id 2) on the right."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY["padded_vocab_size"], (len(valid), length)).astype(np.int64)
    ids[:, 0] = 1
    for row, n in enumerate(valid):
        ids[row, n - 1:] = 2
    mask = (np.arange(length)[None, :] < np.asarray(valid)[:, None]).astype(np.int64)
    return ids, mask


def _torch(oracle, model, ids, monkeypatch, kernel=sqrt_alibi_flash_attn):
    """The oracle's (B, L, D) output and every layer's, with ``kernel`` as its attention function."""
    monkeypatch.setattr(oracle, "flash_attn_func", kernel)
    states = []
    hooks = [layer.register_forward_hook(lambda m, i, o: states.append(o.transpose(0, 1).numpy()))
             for layer in model.transformer.layers]
    with torch.no_grad():
        out = model(torch.from_numpy(ids)).transpose(0, 1).numpy()  # the original returns (L, B, D)
        first = model.tok_embeddings(torch.from_numpy(ids)).transpose(0, 1).numpy()
    for h in hooks:
        h.remove()
    return out, (first, *states)


def test_slopes_are_alibi():
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -k for k in range(1, 9)], rtol=1e-7)
    # 48 heads (the real model): 32 from the power-of-two series, 16 interleaved from the next one
    s = alibi_slopes(48)
    assert s.shape == (48,) and s[0] == 2.0**-0.25 and s[32] == 2.0**-0.125 and s[33] == 2.0**-0.375


def test_parity_padded_batch(oracle, ckpt, monkeypatch):
    model = ckpt.ours
    assert isinstance(model, TextEncoder) and isinstance(model, Step1Model)
    ids, mask = _batch()
    out = model(jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
    last, hidden = _torch(oracle, ckpt.torch, ids, monkeypatch)
    assert len(out.hidden_states) == len(hidden) == 1 + TINY["num_layers"]
    # Every position (pads too: the original computes them causally, as we do) within TOL.
    for what, g, w in [("last_hidden_state", out.last_hidden_state, last),
                       *((f"hidden_states[{i}]", g, w) for i, (g, w) in enumerate(zip(out.hidden_states, hidden)))]:
        err, rel = errors(np.asarray(g), w)
        assert err <= TOL, f"{what}: max-abs {err:.3g}, relative {rel:.3g}"
    np.testing.assert_array_equal(out.hidden_states[-1], out.last_hidden_state)
    np.testing.assert_array_equal(out.attention_mask, mask)


def test_alibi_matters(oracle, ckpt, monkeypatch):
    """diffsynth's CPU fallback (plain causal attention, no position signal) is a different function: the
    positional term is really in ours (dropping it would pass no parity test above and fail here)."""
    ids, mask = _batch(seed=1)
    plain = lambda q, k, v, **_: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    no_alibi, _ = _torch(oracle, ckpt.torch, ids, monkeypatch, kernel=plain)
    ours = np.asarray(ckpt.ours(jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state)
    assert errors(ours, no_alibi)[0] > 1e-2


def test_tokens_never_see_later_positions(ckpt):
    """Causal: a token's state depends on nothing after it (pads included)."""
    ids, mask = _batch(valid=(17, 6), seed=3)
    other = np.where(mask > 0, ids, 7)
    a = np.asarray(ckpt.ours(jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state)
    b = np.asarray(ckpt.ours(jnp.asarray(other), jnp.asarray(mask)).last_hidden_state)
    np.testing.assert_array_equal(a[mask > 0], b[mask > 0])


def test_export_gives_the_checkpoint_keys(ckpt):
    exported = export_component(ckpt.ours)
    saved = ckpt.torch.state_dict()
    assert sorted(exported) == sorted(saved)
    for key, arr in exported.items():
        np.testing.assert_array_equal(arr, saved[key].numpy(), err_msg=key)


def test_default_precision_is_bf16(ckpt):
    model = TextEncoderLoader().load(ckpt.dir)
    assert model.transformer.layers.attention.wqkv.kernel[...].dtype == jnp.bfloat16
    ids, mask = _batch(seed=4)
    got = model(jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state
    want = ckpt.ours(jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state
    assert got.dtype == jnp.bfloat16
    assert errors(np.asarray(got.astype(jnp.float32)), np.asarray(want))[1] < 0.05


def test_second_eager_call_does_not_compile(ckpt, count_compiles):
    ids, mask = _batch(seed=6)
    first = ckpt.ours(jnp.asarray(ids), jnp.asarray(mask))
    with count_compiles() as compiles:
        second = ckpt.ours(jnp.asarray((ids + 1) % TINY["padded_vocab_size"]), jnp.asarray(mask))
    assert compiles[0] == 0, f"a second eager call with the same shapes compiled {compiles[0]} times"
    assert not np.array_equal(first.last_hidden_state, second.last_hidden_state)


def test_fp32_runs_every_matmul_at_highest_precision(ckpt, matmul_precisions):
    found = matmul_precisions(ckpt.ours, *(jnp.asarray(a) for a in _batch()))
    # Per layer (scanned: traced once): wqkv, two attention einsums, wo, w1, w2.
    assert len(found) >= 6 and set(found) == {"HIGHEST"}, f"{len(found)} matmuls at {set(found)}"


def test_sharded_load_matches(ckpt):
    """Loaded on 8 devices (fsdp 2 x tensor 2 x sequence 2): weights and work split, same states."""
    from fastvideo_jax.parallel.activations import mesh_scope
    from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(fsdp=2, tensor=2, sequence=2))
    model = TextEncoderLoader().load(ckpt.dir, mesh=mesh, precision="fp32")
    assert not model.transformer.layers.feed_forward.w1.kernel[...].sharding.is_fully_replicated
    ids, mask = (jnp.asarray(a) for a in _batch(length=16, valid=(16, 8, 3, 9), seed=7))
    with mesh_scope(mesh):
        got = model(ids, mask)
    err, rel = errors(got.last_hidden_state, ckpt.ours(ids, mask).last_hidden_state)
    assert err <= TOL, f"sharded vs one device: max-abs {err:.3g}, relative {rel:.3g}"


def test_bad_inputs_are_user_errors(ckpt):
    with pytest.raises(UserError, match=r"input_ids must be \(batch, length\), got \(5,\)"):
        ckpt.ours(jnp.zeros((5,), jnp.int32))
    with pytest.raises(UserError, match=r"attention_mask \(1, 5\) must have input_ids' shape \(1, 6\)"):
        ckpt.ours(jnp.zeros((1, 6), jnp.int32), jnp.ones((1, 5), jnp.int32))
    with pytest.raises(UserError, match="attention_mask must be right-padded"):
        ckpt.ours(jnp.zeros((1, 4), jnp.int32), jnp.asarray([[0, 1, 1, 1]]))
    with pytest.raises(UserError, match=r"Step1Model does not support attention backend 'cudnn'"):
        Step1Model(StepLLMEncoderConfig(arch_config=stepllm_preset("tiny"), attention_backend="cudnn"),
                   rngs=nnx.Rngs(0))


@pytest.mark.parametrize("bad,match", [
    (dict(num_attention_heads=5), "hidden_size=48 is not a multiple of num_attention_heads=5"),
    (dict(num_attention_groups=4), "num_attention_heads=6 is not a multiple of num_attention_groups=4"),
])
def test_config_errors_are_specific(bad, match):
    with pytest.raises(ValueError, match=match):
        StepLLMArchConfig().update_model_arch({**TINY, **bad})


def test_derived_sizes():
    """The MLP width is rounded up to 256 as the original's FeedForward does; token ids stay below the table."""
    tiny = stepllm_preset("tiny")
    assert (tiny.ffn_size, tiny.vocab_size, tiny.head_dim) == (512, 101, 8)
    assert stepllm_preset("step-llm").ffn_size == 16384
