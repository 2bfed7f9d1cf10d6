"""Sharded training on 8 fake devices gives the single-device losses (<= 1e-5 relative): FSDP (weights and
optimizer moments over fsdp=8, the batch over fsdp) and data x FSDP (data=2 x fsdp=4), with accumulation
(FSDP x sequence parallel: tests/test_train_sequence.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fastvideo_jax.models.loader.component_loader import TransformerLoader
from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh
from fastvideo_jax.testing.tiny_checkpoints import write_random_dit
from fastvideo_jax.training.objective import FlowMatchObjective
from fastvideo_jax.training.optim import OptimConfig
from fastvideo_jax.training.trainer import Trainer

STEPS = 2


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return write_random_dit(tmp_path_factory.mktemp("dit"), "tiny", seed=2)


def _batches():
    rng = np.random.default_rng(0)
    return [{"latents": rng.standard_normal((16, 16, 2, 4, 4)).astype(np.float32),
             "prompt_embeds": rng.standard_normal((16, 8, 32)).astype(np.float32)} for _ in range(STEPS)]


def _run(dit_dir, mesh):
    model = TransformerLoader().load(dit_dir, precision="fp32", mesh=mesh)
    trainer = Trainer(model, FlowMatchObjective(weighting_scheme="logit_normal"),
                      OptimConfig(learning_rate=1e-3, max_grad_norm=0.5), mesh=mesh, accum=2)
    state = trainer.init_state(seed=7)
    losses = []
    for batch in _batches():
        state, metrics = trainer.step(state, trainer.place_batch(batch))
        losses.append(float(metrics["loss"]))
    return losses, state


@pytest.fixture(scope="module")
def single(dit_dir):
    return _run(dit_dir, None)[0]


@pytest.mark.parametrize("config", [MeshConfig(fsdp=8), MeshConfig(data=2, fsdp=4)], ids=["fsdp8", "data2_fsdp4"])
def test_sharded_losses_equal_one_device(dit_dir, single, config):
    check_sharded_run(dit_dir, single, make_mesh(config))


def check_sharded_run(dit_dir, single, mesh):
    losses, state = _run(dit_dir, mesh)
    np.testing.assert_allclose(losses, single, rtol=1e-5)
    # the run was really sharded: weights and Adam moments split 8 ways, the state kept on the mesh
    kernel = state.params["blocks.ffn.fc_in.kernel"]
    assert kernel.sharding.mesh.shape == mesh.shape
    assert kernel.addressable_shards[0].data.size * 8 == kernel.size
    moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "shape", None) == kernel.shape]
    assert moments and all(m.addressable_shards[0].data.size * 8 == m.size for m in moments)
