"""StepVideo's text encoders loaded sharded on 8 fake CPU devices, as tests/test_parallel_encoders.py does for
UMT5/LLaMA: Step-LLM (fused wqkv GQA, ALiBi) and BERT weights split over fsdp / data / sequence (tensor for
heads and the MLP), their work split (prompts over data, tokens over fsdp / sequence), the one-device states
within 1e-5 (fp32, relative Frobenius)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastvideo_jax.configs.models.encoders.bert import BERT_PRESETS
from fastvideo_jax.configs.models.encoders.stepllm import STEPLLM_PRESETS
from fastvideo_jax.models.encoders.bert import BertModel
from fastvideo_jax.models.encoders.stepllm import Step1Model
from fastvideo_jax.models.loader.component_loader import TextEncoderLoader
from fastvideo_jax.parallel.activations import mesh_scope
from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh
from fastvideo_jax.testing.tiny_checkpoints import write_random_component

TOL = 1e-5
MESHES = {
    "fsdp8": MeshConfig(fsdp=8),
    "fsdp4xtp2": MeshConfig(fsdp=4, tensor=2),
    "data2xsp4": MeshConfig(data=2, sequence=4),
}
# (B, L) = (2, 16): 2 prompts (cond, uncond), right-padded; ids inside both tiny vocabularies (BERT 97, Step-LLM 101)
IDS = np.random.default_rng(0).integers(1, 90, (2, 16)).astype(np.int32)
MASK = (np.arange(16)[None] < np.array([[16], [9]])).astype(np.int32)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("step_encoders")
    # 8 query heads in 4 KV groups, 64 wide: tensor=2 splits the query heads and the KV groups
    llm = dict(STEPLLM_PRESETS["tiny"], hidden_size=64, num_attention_heads=8, num_attention_groups=4)
    write_random_component(root / "text_encoder", Step1Model, "Step1Model", llm, weights_name="model.safetensors",
                           seed=3)
    write_random_component(root / "text_encoder_2", BertModel, "BertModel", BERT_PRESETS["tiny"],
                           weights_name="model.safetensors", seed=4, extra_config={"model_type": "bert"})
    return {name: root / name for name in ("text_encoder", "text_encoder_2")}


def _states(encoder) -> np.ndarray:
    return np.asarray(encoder(jnp.asarray(IDS), jnp.asarray(MASK)).last_hidden_state)


def _device0_fraction(encoder) -> float:
    total = held = 0
    for _, var in nnx.to_flat_state(nnx.state(encoder, nnx.Param)):
        a = var[...]
        total += a.nbytes
        held += sum(s.data.nbytes for s in a.addressable_shards if s.device.id == 0)
    return held / total


def _flops(encoder, mesh) -> float:
    graph, state = nnx.split(encoder)
    fn = jax.jit(lambda s, i, m: nnx.merge(graph, s).forward(i, m).last_hidden_state)
    with mesh_scope(mesh):
        cost = fn.lower(state, jnp.asarray(IDS), jnp.asarray(MASK)).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


@pytest.mark.parametrize("name", ["text_encoder", "text_encoder_2"])
def test_encoder_on_meshes_equals_one_device_and_splits(encoders, name):
    reference = _states(TextEncoderLoader().load(encoders[name], precision="fp32"))
    for mesh_name, config in MESHES.items():
        mesh = make_mesh(config)
        encoder = TextEncoderLoader().load(encoders[name], mesh=mesh, precision="fp32")
        assert _device0_fraction(encoder) <= 0.3, (name, mesh_name)  # 1/8 of the big weights, norms whole
        got = _states(encoder)
        rel = np.linalg.norm(got - reference) / np.linalg.norm(reference)
        assert rel <= TOL, (name, mesh_name, rel)
    single = _flops(TextEncoderLoader().load(encoders[name], precision="fp32"), None)
    mesh = make_mesh(MESHES["data2xsp4"])
    split = _flops(TextEncoderLoader().load(encoders[name], mesh=mesh, precision="fp32"), mesh)
    assert split <= single / 4, (name, split, single)  # prompts over data, tokens over sequence
