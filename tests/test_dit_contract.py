"""The DiT contract (models/dits/base.py): class data checked at class creation, attention backends checked
before a weight is read, one keyword call signature that refuses what a DiT does not take."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastvideo_jax.attention.api import AttentionBackend, resolve_backend
from fastvideo_jax.configs.models.dits.base import DiTConfig
from fastvideo_jax.models.dits.base import BaseDiT, UnsupportedBackendError
from fastvideo_jax.models.dits.wanvideo import WanTransformer3DModel
from fastvideo_jax.models.loader import component_loader
from fastvideo_jax.models.loader.component_loader import TransformerLoader
from fastvideo_jax.testing.tiny_checkpoints import write_random_dit
from tests.oracles import dit_call, errors


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return write_random_dit(tmp_path_factory.mktemp("contract") / "transformer", seed=2)


def _inputs(batch=1):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, 16, 2, 4, 4)), jnp.float32)
    ctx = jnp.asarray(np.random.default_rng(1).standard_normal((batch, 3, 32)), jnp.float32)
    return x, jnp.full((batch,), 500.0), ctx


def test_unsupported_backend_is_refused_before_any_weight_is_read(dit_dir, monkeypatch):
    def no_reads(*a, **k):
        raise AssertionError("weights were read before the backend was checked")

    monkeypatch.setattr(component_loader, "_from_safetensors", no_reads)
    # Wan declares every backend there is; a Wan class without SAGE_ATTN stands in for a DiT that lacks one.
    monkeypatch.setattr(WanTransformer3DModel, "_supported_attention_backends",
                        WanTransformer3DModel._supported_attention_backends - {AttentionBackend.SAGE_ATTN})
    with pytest.raises(UnsupportedBackendError, match=r"WanTransformer3DModel does not support attention backend "
                                                      r"'sage_attn'; it supports \[.*'cudnn'.*'sliding_tile_attn'"):
        TransformerLoader().load(dit_dir, attention_backend="SAGE_ATTN")
    with pytest.raises(UnsupportedBackendError, match="unknown attention backend 'warp_speed'"):
        TransformerLoader().load(dit_dir, attention_backend="warp_speed")


def test_fastvideo_backend_names_map_onto_ours(dit_dir):
    q = jnp.zeros((1, 8, 2, 16), jnp.float32)
    assert resolve_backend("TORCH_SDPA", q, q, q) is AttentionBackend.REFERENCE
    assert resolve_backend("flash_attn", q, q, q) is AttentionBackend.REFERENCE  # CPU: no fused kernel (logged)
    with pytest.raises(ValueError, match="not a dense attention backend"):
        resolve_backend("SLIDING_TILE_ATTN", q, q, q)
    # The names select the same computation as ours on the same weights.
    x, t, ctx = _inputs()
    ref = dit_call(TransformerLoader().load(dit_dir, precision="fp32", attention_backend="reference"), x, t, ctx)
    sdpa = dit_call(TransformerLoader().load(dit_dir, precision="fp32", attention_backend="TORCH_SDPA"), x, t, ctx)
    assert errors(sdpa, ref)[0] == 0.0


def test_sliding_tile_attn_is_the_sliding_tile_self_attention(dit_dir):
    by_name = TransformerLoader().load(dit_dir, precision="fp32", attention_backend="SLIDING_TILE_ATTN",
                                       sta_tile=(1, 2, 2), sta_window=(1, 1, 1))
    by_knob = TransformerLoader().load(dit_dir, precision="fp32", self_attention_backend="sliding_tile",
                                       sta_tile=(1, 2, 2), sta_window=(1, 1, 1))
    assert by_name.sta_plan == by_knob.sta_plan and by_name.sta_plan is not None
    x, t, ctx = _inputs()
    assert errors(dit_call(by_name, x, t, ctx), dit_call(by_knob, x, t, ctx))[0] == 0.0


def test_call_is_by_keyword_and_refuses_what_wan_does_not_take(dit_dir):
    model = TransformerLoader().load(dit_dir, precision="fp32")
    x, t, ctx = _inputs()
    with pytest.raises(TypeError, match=r"unexpected input\(s\) \['encoder_attention_mask'\]"):
        model(hidden_states=x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=jnp.ones((1, 3)))
    with pytest.raises(TypeError, match="no guidance embedding"):
        model(hidden_states=x, encoder_hidden_states=ctx, timestep=t, guidance=jnp.ones((1,)))
    arch = model.config.arch_config
    assert (model.hidden_size, model.num_attention_heads, model.num_channels_latents) == (
        arch.num_attention_heads * arch.attention_head_dim, arch.num_attention_heads, arch.out_channels)
    assert model.param_names_mapping is arch.param_names_mapping and model.param_names_mapping


def test_subclass_must_declare_its_config_and_backends():
    with pytest.raises(TypeError, match="must set config_class to a DiTConfig subclass"):
        class NoConfig(BaseDiT):  # noqa: F841
            pass

    with pytest.raises(TypeError, match="must hold AttentionBackend members"):
        class BadBackends(BaseDiT):  # noqa: F841
            config_class = DiTConfig
            _supported_attention_backends = frozenset({"cudnn"})

    @dataclasses.dataclass(frozen=True)
    class OtherConfig(DiTConfig):
        pass

    with pytest.raises(TypeError, match="takes a WanVideoConfig, got OtherConfig"):
        WanTransformer3DModel(OtherConfig(), rngs=nnx.Rngs(0))
