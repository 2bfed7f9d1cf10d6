"""Sliding-tile attention inside the Wan DiT: full window equals dense; per-layer selection runs the right layers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from fastvideo_jax.models.loader.component_loader import TransformerLoader
from fastvideo_jax.testing import write_random_dit
from tests.oracles import errors

TILE = (1, 2, 2)  # small tiles so the tiny latent grid (3, 3, 5) spans several tiles (with ragged edges)


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return write_random_dit(tmp_path_factory.mktemp("sta") / "transformer", seed=4)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 16, 3, 6, 10)), jnp.float32)
    return x, jnp.asarray([700.0, 20.0]), jnp.asarray(rng.standard_normal((2, 7, 32)), jnp.float32)


def _load(d, **overrides):
    return TransformerLoader().load(d, precision="fp32", **overrides)


@pytest.fixture(scope="module")
def dense_out(dit_dir, inputs):
    return np.asarray(_load(dit_dir)(*inputs))


def test_sta_full_window_on_all_layers_equals_dense(dit_dir, inputs, dense_out):
    model = _load(dit_dir, self_attention_backend="sliding_tile", sta_tile=TILE)
    err, rel = errors(model(*inputs), dense_out)
    assert err < 1e-5, f"STA (full window) vs dense: max-abs {err:.3e}, relative {rel:.3e}"


def test_small_window_changes_the_output(dit_dir, inputs, dense_out):
    model = _load(dit_dir, self_attention_backend="sliding_tile", sta_tile=TILE, sta_window=(1, 1, 1))
    err, _ = errors(model(*inputs), dense_out)
    assert err > 1e-3, "a 1x1x1-tile window should not reproduce dense attention"


def test_per_layer_windows(dit_dir, inputs, dense_out):
    small = (1, 1, 1)
    uniform = np.asarray(_load(dit_dir, self_attention_backend="sliding_tile", sta_tile=TILE, sta_window=small)(*inputs))
    per_layer_same = _load(dit_dir, self_attention_backend="sliding_tile", sta_tile=TILE,
                           sta_layer_windows=(small, small))(*inputs)
    full_then_dense = _load(dit_dir, self_attention_backend="sliding_tile", sta_tile=TILE,
                            sta_layer_windows=((9, 9, 9), None))(*inputs)
    mixed = _load(dit_dir, self_attention_backend="sliding_tile", sta_tile=TILE,
                  sta_layer_windows=(small, None))(*inputs)
    assert errors(per_layer_same, uniform)[0] < 1e-6
    assert errors(full_then_dense, dense_out)[0] < 1e-5
    assert min(errors(mixed, dense_out)[0], errors(mixed, uniform)[0]) > 1e-4, "layer 1 must be dense, layer 0 STA"


def test_per_head_windows_accepted(dit_dir, inputs):
    model = _load(dit_dir, self_attention_backend="sliding_tile", sta_tile=TILE, sta_window=((1, 1, 1), (3, 3, 3)))
    assert np.isfinite(np.asarray(model(*inputs))).all()


def test_bad_sta_configs_are_clear(dit_dir):
    with pytest.raises(ValueError, match="2 layers"):
        _load(dit_dir, self_attention_backend="sliding_tile", sta_layer_windows=((1, 1, 1),))
    with pytest.raises(ValueError, match="self_attention_backend"):
        _load(dit_dir, self_attention_backend="sparse-ish")
