"""The Wan DiT split over a mesh (8 fake CPU devices): Ulysses sequence parallel, batch over data, mixed meshes.

Every mesh must give the one-device output (fp32, 1e-5 relative), including token counts the sequence degree
does not divide (padded and masked); the compiled step must hold all-to-all collectives when sp > 1, and the
per-device FLOPs must drop with sp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastvideo_jax.configs.models.dits.wanvideo import WanVideoConfig
from fastvideo_jax.errors import UserError
from fastvideo_jax.models.dits.wanvideo import WanTransformer3DModel
from fastvideo_jax.models.loader.component_loader import build_abstract, state_shardings
from fastvideo_jax.parallel.activations import mesh_scope
from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh
from fastvideo_jax.parallel.rules import DIT_RULES
from fastvideo_jax.utils.nnx_vars import var_value
from tests.oracles import dit_call

# 8 heads so sp = 8 divides them; head dim 12 keeps the 3-D RoPE split (4, 4, 4).
ARCH = dict(patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def _model(num_layers=2, heads=8, in_channels=16, out_channels=16, **overrides) -> WanTransformer3DModel:
    """Built abstractly, then every parameter filled with noise (zero-initialised biases and tables included)."""
    config = WanVideoConfig(precision="fp32", attention_backend="reference").update_model_arch(
        {**ARCH, "num_layers": num_layers, "num_attention_heads": heads, "in_channels": in_channels,
         "out_channels": out_channels})
    if overrides:
        config = config.update_model_config(**overrides)
    graphdef, abstract = build_abstract(WanTransformer3DModel, config)
    rng = np.random.default_rng(1)
    state = nnx.from_flat_state([(p, v.replace(jnp.asarray(0.2 * rng.standard_normal(var_value(v).shape),
                                                           jnp.float32)))
                                 for p, v in nnx.to_flat_state(abstract)])
    return nnx.merge(graphdef, state)


def _inputs(batch, frames, height, width, text_len=5, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, (batch, 16, frames, height, width), jnp.float32)
    t = jnp.asarray([999.0, 500.0, 250.0, 1.0][:batch])
    ctx = jax.random.normal(k2, (batch, text_len, 32), jnp.float32)
    return x, t, ctx


def _forward(graphdef):
    return jax.jit(lambda state, x, t, ctx: dit_call(nnx.merge(graphdef, state), x, t, ctx))


def _run_on(model, mesh, inputs):
    graphdef, state = nnx.split(model)
    if mesh is None:
        return np.asarray(_forward(graphdef)(state, *inputs))
    shardings = state_shardings(state, DIT_RULES, mesh)
    state = nnx.from_flat_state([(p, v.replace(jax.device_put(v[...], shardings[p])))
                                 for p, v in nnx.to_flat_state(state)])
    with mesh_scope(mesh):
        return np.asarray(_forward(graphdef)(state, *inputs))


@pytest.fixture(scope="module")
def model():
    return _model()


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# sp = 2, 4, 8; data = 1, 2; mixed with fsdp and tensor
MESHES = [MeshConfig(data=2, sequence=4), MeshConfig(sequence=8), MeshConfig(data=2, fsdp=2, sequence=2),
          MeshConfig(tensor=2, sequence=4)]


def test_meshes_equal_one_device(model):
    # 3x3x3 = 27 tokens: sp = 2, 4, 8 divide none of them (the padded and masked path); a batch of 2 (CFG).
    inputs = _inputs(2, 3, 6, 6)
    ref = _run_on(model, None, inputs)
    for config in MESHES:
        out = _run_on(model, make_mesh(config), inputs)
        assert out.shape == ref.shape
        assert _rel(out, ref) <= 1e-5, config


def test_eager_call_of_a_model_on_a_mesh_splits_the_work(model, monkeypatch):
    """A model loaded on a mesh, called eagerly (no mesh in scope), runs under its parameters' mesh."""
    from fastvideo_jax.models.dits import wanvideo
    from fastvideo_jax.parallel import activations

    seen = []
    real = wanvideo.ulysses_attention

    def spy(*args, **kwargs):
        mesh = activations.active_mesh()
        seen.append(None if mesh is None else dict(mesh.shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(wanvideo, "ulysses_attention", spy)
    inputs = _inputs(2, 2, 6, 6)  # a shape no other test traces, so both calls trace here (the spy sees them)
    ref = np.asarray(dit_call(model, *inputs))
    mesh = make_mesh(MeshConfig(data=2, sequence=4))
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, DIT_RULES, mesh)
    placed = nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(jax.device_put(v[...], shardings[p])))
                                                      for p, v in nnx.to_flat_state(state)]))
    out = np.asarray(dit_call(placed, *inputs))
    assert seen and seen[0] is None and seen[-1] == {"data": 2, "fsdp": 1, "tensor": 1, "sequence": 4}
    assert _rel(out, ref) <= 1e-5


def _compiled(model, mesh, inputs):
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, DIT_RULES, mesh)
    abstract = nnx.from_flat_state([(p, v.replace(jax.ShapeDtypeStruct(v[...].shape, v[...].dtype,
                                                                        sharding=shardings[p])))
                                    for p, v in nnx.to_flat_state(state)])
    with mesh_scope(mesh):
        return _forward(graphdef).lower(abstract, *inputs).compile()


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_compiled_step_has_all_to_all_and_flops_drop_with_sp():
    # One layer (scan bodies are counted once by cost_analysis; one layer makes the count exact), 2x8x8 = 512
    # tokens and a 4-token text so that token-parallel work dominates.
    model = _model(num_layers=1)
    inputs = _inputs(1, 4, 16, 16, text_len=4)
    flops = {}
    for sp in (1, 2, 8):
        compiled = _compiled(model, make_mesh(MeshConfig(sequence=sp)), inputs)
        hlo = compiled.as_text()
        assert ("all-to-all" in hlo) == (sp > 1), sp
        flops[sp] = _flops(compiled)
    # Bound: per-device FLOPs at sp <= 1.25 x (one-device FLOPs / sp); the excess is the replicated time/text
    # embedding and text K/V projections.
    for sp in (2, 8):
        assert flops[sp] <= 1.25 * flops[1] / sp, (sp, flops)


def test_heads_not_divisible_by_sequence_is_a_clear_error():
    six_heads = _model(num_layers=1, heads=6)
    with mesh_scope(make_mesh(MeshConfig(sequence=4))), \
            pytest.raises(UserError, match="6 attention heads do not divide over mesh sequence=4"):
        graphdef, state = nnx.split(six_heads)
        jax.eval_shape(_forward(graphdef), state, *_inputs(1, 2, 4, 4))


def test_sliding_tile_under_sequence_parallel():
    # Per-head windows under sp = 4: each device holds 2 heads and picks their windows (lax.switch).
    windows = ((1, 1, 1), (2, 2, 2), (1, 2, 3), (3, 3, 3), (2, 1, 1), (1, 1, 2), (2, 3, 1), (3, 2, 2))
    model = _model(self_attention_backend="sliding_tile", sta_tile=(1, 2, 2), sta_layer_windows=(windows, None))
    inputs = _inputs(2, 4, 8, 8)  # token grid 4x4x4 = 64: tiles (1, 2, 2), divisible by sp = 4
    ref = _run_on(model, None, inputs)
    out = _run_on(model, make_mesh(MeshConfig(data=2, sequence=4)), inputs)
    assert _rel(out, ref) <= 1e-5
    with pytest.raises(UserError, match="sliding-tile attention needs the whole token grid"):
        _run_on(model, make_mesh(MeshConfig(sequence=8)), _inputs(1, 3, 6, 6))
