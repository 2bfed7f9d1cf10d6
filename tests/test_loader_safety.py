"""Loader hardening: weights that are not floats or not finite are refused, naming tensor/parameter and file."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from safetensors.numpy import load_file

from fastvideo_jax.errors import CheckpointError
from fastvideo_jax.models.loader import component_loader
from fastvideo_jax.models.loader.component_loader import TransformerLoader
from fastvideo_jax.models.loader.safetensors_io import save_safetensors
from fastvideo_jax.models.registry import class_names
from fastvideo_jax.testing import write_random_dit

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def tiny_dit(tmp_path):
    return write_random_dit(tmp_path / "transformer", "tiny")


def _rewrite(directory, key, fn):
    tensors = load_file(str(directory / WEIGHTS))
    tensors[key] = fn(tensors[key])
    save_safetensors(directory / WEIGHTS, tensors, metadata={"format": "pt"})


def test_good_tiny_dit_loads(tiny_dit):
    TransformerLoader().load(tiny_dit, precision="fp32")


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_integer_weight_is_refused_naming_tensor_and_file(tiny_dit, dtype):
    """Today an int32 tensor is cast and loads (a float weight truncated to int32 loads as zeros)."""
    key = "blocks.1.attn1.to_q.weight"
    _rewrite(tiny_dit, key, lambda a: (a * 0).astype(dtype))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS}: tensor '{key}' is stored as"):
        TransformerLoader().load(tiny_dit, precision="fp32")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_weight_is_refused_naming_component_and_parameter(tiny_dit, value):
    def poison(a):
        a = a.copy()
        a.flat[3] = value
        return a

    _rewrite(tiny_dit, "blocks.1.ffn.net.2.bias", poison)
    with pytest.raises(CheckpointError, match=rf"{tiny_dit}: parameter\(s\) blocks\.ffn\..* contain NaN or Inf"):
        TransformerLoader().load(tiny_dit, precision="fp32")


def test_nonfinite_weight_is_refused_in_bf16(tiny_dit):
    _rewrite(tiny_dit, "patch_embedding.weight", lambda a: np.full_like(a, np.nan))
    with pytest.raises(CheckpointError, match="patch_embedding.*NaN or Inf"):
        TransformerLoader().load(tiny_dit, precision="bf16")


def test_loaders_use_the_registry_accessor():
    assert "WanTransformer3DModel" in class_names("dit") and "AutoencoderKLWan" in class_names("vae")
    assert "UMT5EncoderModel" in class_names("text_encoder")
    with pytest.raises(ValueError, match="unknown component kind"):
        class_names("dits")
    assert "registry._" not in inspect.getsource(component_loader)
