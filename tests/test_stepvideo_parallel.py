"""The StepVideo DiT split over a mesh (8 fake CPU devices): video tokens over sequence (Ulysses self-attention,
cross-attention per token shard), batch over data, weights over fsdp, heads over tensor; every mesh gives the
one-device output."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastvideo_jax.configs.models.dits.stepvideo import StepVideoConfig
from fastvideo_jax.models.dits.stepvideo import StepVideoModel
from fastvideo_jax.models.loader.component_loader import build_abstract, state_shardings
from fastvideo_jax.parallel.activations import mesh_scope
from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh
from fastvideo_jax.parallel.rules import DIT_RULES
from fastvideo_jax.utils.nnx_vars import var_value
from tests.oracles import errors
from tests.test_stepvideo_dit import TINY, _inputs

# 8 heads of 16 (RoPE split 8, 4, 4) so that sequence = 8 divides the heads; random weights, no oracle needed.
MESH_ARCH = dict(TINY, num_attention_heads=8, attention_head_dim=16)


def _mesh_model():
    config = StepVideoConfig(precision="fp32", attention_backend="reference").update_model_arch(MESH_ARCH)
    graphdef, abstract = build_abstract(StepVideoModel, config)
    rng = np.random.default_rng(1)
    return graphdef, nnx.from_flat_state([(p, v.replace(jnp.asarray(0.2 * rng.standard_normal(var_value(v).shape),
                                                                    jnp.float32)))
                                          for p, v in nnx.to_flat_state(abstract)])


def _run_on_mesh(graphdef, state, mesh, inputs):
    """(output, compiled HLO text) of the jitted forward, the parameters placed by DIT_RULES on ``mesh``."""
    fn = jax.jit(lambda state, inputs: nnx.merge(graphdef, state)(**inputs))
    if mesh is not None:
        shardings = state_shardings(state, DIT_RULES, mesh)
        state = nnx.from_flat_state([(p, v.replace(jax.device_put(v[...], shardings[p])))
                                     for p, v in nnx.to_flat_state(state)])
    with mesh_scope(mesh):
        compiled = fn.lower(state, inputs).compile()
        return np.asarray(compiled(state, inputs)), compiled.as_text()


def test_sequence_meshes_equal_one_device():
    """Video tokens over sequence (Ulysses self-attention: all-to-all; cross-attention per token shard), batch
    over data, weights over fsdp / heads over tensor: the one-device output (fp32, 1e-5 relative). 3x3x3 = 27
    tokens: no sequence size divides them (the padded and masked path); padded text rows."""
    graphdef, state = _mesh_model()
    inputs = {k: jnp.asarray(v.numpy()) for k, v in _inputs(5, 2, 3, 3, 3, (2, 5), 5, clip_len=3).items()}
    ref, hlo = _run_on_mesh(graphdef, state, None, inputs)
    assert "all-to-all" not in hlo
    for config in (MeshConfig(sequence=8), MeshConfig(data=2, sequence=4), MeshConfig(fsdp=2, tensor=2, sequence=2)):
        out, hlo = _run_on_mesh(graphdef, state, make_mesh(config), inputs)
        err, rel = errors(out, ref)
        assert rel <= 1e-5, (config, err, rel)
        assert "all-to-all" in hlo, config
