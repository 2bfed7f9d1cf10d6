"""The jitted training step takes the frozen variables (a LoRA run's base weights) as an argument: not captured
constants of the trace (which would embed 28 GB of a 14B DiT in the computation), not donated, one compile."""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx

from fastvideo_jax.configs.models.dits.wanvideo import WAN_PRESETS, WanVideoConfig
from fastvideo_jax.models.dits.wanvideo import WanTransformer3DModel
from fastvideo_jax.models.layers.lora import LORA_FILTER, inject_lora
from fastvideo_jax.training.objective import FlowMatchObjective
from fastvideo_jax.training.optim import OptimConfig
from fastvideo_jax.training.trainer import Trainer

HLO_CONSTANT = re.compile(r"stablehlo\.constant dense[^\n]*?: tensor<([0-9x]+)x[a-z0-9]+>")


def _lora_trainer():
    config = WanVideoConfig(precision="fp32").update_model_arch(dict(WAN_PRESETS["tiny"]))
    with nnx.use_eager_sharding(False):
        model = WanTransformer3DModel(config, rngs=nnx.Rngs(0))
    inject_lora(model, rank=2, alpha=2, rngs=nnx.Rngs(1))
    trainer = Trainer(model, FlowMatchObjective(), OptimConfig(learning_rate=1e-3), trainable=LORA_FILTER)
    rng = np.random.default_rng(0)
    batch = trainer.place_batch({"latents": rng.standard_normal((1, 16, 2, 4, 4)).astype(np.float32),
                                 "prompt_embeds": rng.standard_normal((1, 8, 32)).astype(np.float32)})
    return trainer, batch


def test_frozen_weights_are_step_arguments_not_constants():
    trainer, batch = _lora_trainer()
    frozen = [np.asarray(a) for a in jax.tree.leaves(trainer.split.frozen)]
    weights = {a.shape for a in frozen if a.ndim >= 2 and a.size >= 256}  # the frozen matrices' shapes
    state = trainer.init_state(0)

    # the traced step captures no frozen array: its jaxpr's constants are all small
    closed = jax.make_jaxpr(trainer.step_fn)(state, trainer.split.frozen, batch)
    captured = [np.shape(c) for c in closed.consts if np.shape(c) in weights]
    assert not captured, f"the step closes over frozen arrays of shapes {captured}"

    lowered = trainer.lower(state, batch)
    # every frozen leaf is an argument of the jitted step, none donated
    state_info, frozen_info, _ = lowered.args_info[0]
    infos = jax.tree.leaves(frozen_info)
    assert [tuple(i.shape) for i in infos] == [a.shape for a in frozen]
    assert not any(i.donated for i in infos)
    assert all(i.donated for i in jax.tree.leaves(state_info))
    # and the computation embeds no dense constant as large as a frozen matrix
    constants = [tuple(int(d) for d in m.group(1).split("x")) for m in HLO_CONSTANT.finditer(lowered.as_text())]
    embedded = [c for c in constants if c in weights]
    assert not embedded, f"HLO constants shaped like frozen weights: {embedded}"
    memory = lowered.compile().memory_analysis()
    if memory is not None:
        assert memory.argument_size_in_bytes >= sum(a.nbytes for a in frozen)


def test_step_compiles_once_and_leaves_the_frozen_weights():
    trainer, batch = _lora_trainer()
    before = [np.asarray(a) for a in jax.tree.leaves(trainer.split.frozen)]
    state = trainer.init_state(0)
    for _ in range(3):
        state, _ = trainer.step(state, batch)
    assert trainer.jitted_step(state)._cache_size() == 1
    after = jax.tree.leaves(trainer.split.frozen)
    assert not any(a.is_deleted() for a in after)  # not donated
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, np.asarray(b))
