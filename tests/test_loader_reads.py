"""Sharded safetensors loading reads each source tensor once, builds only addressable shards, loses nothing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from fastvideo_jax.configs.models.dits.wanvideo import WAN_PRESETS
from fastvideo_jax.configs.models.encoders.t5 import T5_PRESETS
from fastvideo_jax.models.dits.wanvideo import WanTransformer3DModel
from fastvideo_jax.models.encoders.t5 import UMT5EncoderModel
from fastvideo_jax.models.loader.component_loader import TextEncoderLoader, TransformerLoader
from fastvideo_jax.models.loader.safetensors_io import SafetensorsCheckpoint
from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh
from fastvideo_jax.testing.tiny_checkpoints import write_random_component
from fastvideo_jax.utils.nnx_vars import host_params


@pytest.fixture(scope="module")
def components(tmp_path_factory) -> dict[str, tuple[Path, type]]:
    root = tmp_path_factory.mktemp("reads")
    dit = write_random_component(root / "transformer", WanTransformer3DModel, "WanTransformer3DModel",
                                 WAN_PRESETS["tiny"], seed=3)
    t5 = write_random_component(root / "text_encoder", UMT5EncoderModel, "UMT5EncoderModel", T5_PRESETS["tiny"],
                                weights_name="model.safetensors", seed=4, extra_config={"model_type": "umt5"})
    return {"transformer": (dit, TransformerLoader), "text_encoder": (t5, TextEncoderLoader)}


def _counting_reads(monkeypatch) -> Counter:
    reads: Counter = Counter()
    original = SafetensorsCheckpoint.read

    def read(self, key):
        reads[key] += 1
        return original(self, key)

    monkeypatch.setattr(SafetensorsCheckpoint, "read", read)
    return reads


@pytest.mark.parametrize("name", ["text_encoder", "transformer"])
@pytest.mark.parametrize("mesh_config", [MeshConfig(fsdp=8), MeshConfig(fsdp=4, tensor=2)], ids=["fsdp8", "fsdp4xtp2"])
def test_each_tensor_read_once_and_values_equal(components, name, mesh_config, monkeypatch):
    directory, loader = components[name]
    reference = host_params(nnx.state(loader().load(directory), nnx.Param))
    reads = _counting_reads(monkeypatch)
    model = loader().load(directory, mesh=make_mesh(mesh_config))
    checkpoint = SafetensorsCheckpoint.from_dir(directory)
    used = set(reads)
    assert used == set(checkpoint), f"tensors not read: {sorted(set(checkpoint) - used)}"
    assert max(reads.values()) == 1, f"re-read tensors: {[k for k, n in reads.items() if n > 1]}"
    state = nnx.state(model, nnx.Param)
    sharded = 0
    for path, var in nnx.to_flat_state(state):
        array = var[...]
        sharded += not array.sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(array), reference[path], err_msg=".".join(map(str, path)))
    assert sharded >= 4, "the mesh sharded almost nothing: the test would not see re-reads"

