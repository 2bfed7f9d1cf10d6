"""The encoder contract (fastvideo_jax.models.encoders.base): class variables enforced, output is a pytree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from fastvideo_jax.attention.api import AttentionBackend
from fastvideo_jax.models.encoders.base import BaseEncoderOutput, ImageEncoder, TextEncoder


def test_encoder_without_supported_backends_is_refused():
    with pytest.raises(TypeError, match="NoBackends must declare _supported_attention_backends"):
        class NoBackends(TextEncoder):
            pass

    with pytest.raises(TypeError, match=r"Strings._supported_attention_backends must hold AttentionBackend members"):
        class Strings(ImageEncoder):
            _supported_attention_backends = ("reference",)

    class Declared(ImageEncoder):
        _supported_attention_backends = (AttentionBackend.REFERENCE,)

    assert Declared._supported_attention_backends == (AttentionBackend.REFERENCE,)


def test_output_is_a_pytree_through_jit():
    @jax.jit
    def f(x):
        return BaseEncoderOutput(last_hidden_state=x, hidden_states=(x, x + 1), pooler_output=x[:, 0])

    out = f(jnp.ones((2, 3, 4)))
    assert isinstance(out, BaseEncoderOutput) and out.attention_mask is None
    assert len(out.hidden_states) == 2 and float(out.hidden_states[1][0, 0, 0]) == 2.0
    assert out.pooler_output.shape == (2, 4)
    assert len(jax.tree.leaves(out)) == 4
