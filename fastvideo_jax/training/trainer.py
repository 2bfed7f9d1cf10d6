"""The jitted training step: flow-matching loss on the DiT, micro-batches accumulated, one optax update.

``Trainer(model, objective, optim, ...)`` splits the DiT once (``ParamSplit``: fp32 masters of what the
``trainable`` filter selects, the rest frozen), builds the optimizer and ONE jitted step

    step(state, batch) -> (state, {"loss", "grad_norm", "lr"})    # jitted: step_fn(state, frozen, batch)

``batch`` holds ``accum`` micro-batches stacked on a leading axis (``latents`` (A, B, C, F, H, W),
``prompt_embeds`` (A, B, L, E)); their gradients are summed in fp32 under one ``lax.scan`` and averaged, so the
update sees the mean gradient of A*B samples. The state (``TrainState``: step, master parameters, optimizer
state, RNG key) is donated and keeps its shardings: parameters and optimizer moments where the loader put the
weights (FSDP: the model dim over fsdp/sequence/data, ``DIT_RULES``), the batch over data (then fsdp),
``ACTIVATION_RULES``. The frozen variables (``split.frozen``: the base weights under LoRA) are the jitted
function's second argument, not donated, with their own shardings: never constants captured by the trace.
The randomness of step ``s`` is ``fold_in(key, s)`` (micro-batch ``i``: a further
``fold_in(i)``), a function of the step alone: a resumed run draws what an uninterrupted one did, and
jax's partitionable threefry makes the draws independent of the mesh.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fastvideo_jax.models.layers.compiled import matmul_precision_scope
from fastvideo_jax.parallel.activations import mesh_scope, spec_for
from fastvideo_jax.training.objective import FlowMatchObjective
from fastvideo_jax.training.optim import OptimConfig, learning_rate_schedule, make_optimizer
from fastvideo_jax.training.params import ParamSplit

__all__ = ["BATCH_KEYS", "TrainState", "Trainer"]

F32 = jnp.float32
BATCH_KEYS = ("latents", "prompt_embeds")


class TrainState(NamedTuple):
    step: jax.Array  # int32 (): optimizer updates done
    params: dict[str, jax.Array]  # trainable fp32 masters, flat keys
    opt_state: Any
    rng: jax.Array  # uint32 key data of the run's base key


class Trainer:
    def __init__(self, model: nnx.Module, objective: FlowMatchObjective, optim: OptimConfig, *,
                 mesh: Mesh | None = None, accum: int = 1, trainable: Any = nnx.Param,
                 latents_mean: Any = None, latents_std: Any = None):
        if accum < 1:
            raise ValueError(f"gradient accumulation must be >= 1, got {accum}")
        self.objective, self.optim, self.mesh, self.accum = objective, optim, mesh, accum
        self.split = ParamSplit(model, trainable)
        self.tx = make_optimizer(optim)
        self.schedule = learning_rate_schedule(optim)
        channels = None if latents_mean is None else len(latents_mean)
        self._scale = None if latents_mean is None else (
            np.asarray(latents_mean, np.float32).reshape(1, channels, 1, 1, 1),
            (1.0 / np.asarray(latents_std, np.float32)).reshape(1, channels, 1, 1, 1))
        self._step = None

    # ---- state --------------------------------------------------------------------------------------------
    def init_state(self, seed: int) -> TrainState:
        """Step 0: fp32 master copies of the trainable parameters, a fresh optimizer state, the run's key."""
        params = self.split.master_params()
        opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings(params))(params)
        rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), self._replicated())
        return TrainState(jax.device_put(jnp.zeros((), jnp.int32), self._replicated()), params, opt_state, rng)

    def abstract_state(self, seed: int = 0) -> TrainState:
        """Shapes, dtypes and shardings of the state (a checkpoint restores into this)."""
        params = {k: jax.ShapeDtypeStruct(v.shape, F32, sharding=v.sharding)
                  for k, v in ((k, self.split._initial.get(k)) for k in self.split.keys) if v is not None}
        if len(params) != len(self.split.keys):
            raise RuntimeError("abstract_state() needs the split's initial parameters (call it before init_state)")
        opt = jax.eval_shape(self.tx.init, params)
        shardings = self.opt_shardings(params)
        opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt, shardings)
        rep = self._replicated()
        return TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params, opt,
                          jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep))

    def opt_shardings(self, params: Mapping[str, Any]):
        """The optimizer state's shardings: parameter-shaped moments like their parameters, counters replicated."""
        abstract = jax.eval_shape(self.tx.init, params)
        return optax.tree_map_params(self.tx, lambda _, p: p.sharding, abstract, params,
                                     transform_non_params=lambda _: self._replicated(),
                                     is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))

    def _replicated(self):
        if self.mesh is not None:
            return NamedSharding(self.mesh, PartitionSpec())
        leaf = next(iter(self.split._initial.values()), None)
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])

    # ---- data ---------------------------------------------------------------------------------------------
    def place_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host arrays with ``accum * B`` rows -> (accum, B, ...) on the devices, B over the mesh's batch axes.
        With several processes each gives its own rows (``batch_iterator(process_index=...)``)."""
        out = {}
        for key in BATCH_KEYS:
            a = np.asarray(batch[key], np.float32)
            if a.shape[0] % self.accum:
                raise ValueError(f"batch {key} has {a.shape[0]} rows, not a multiple of accumulation {self.accum}")
            a = a.reshape((self.accum, a.shape[0] // self.accum) + a.shape[1:])
            if self.mesh is None:
                out[key] = jax.device_put(a, self._replicated())
            elif jax.process_count() > 1:  # each process holds its rows of the global batch
                global_shape = (a.shape[0], a.shape[1] * jax.process_count()) + a.shape[2:]
                spec = spec_for(("batch",) + (None,) * (a.ndim - 2), global_shape[1:], self.mesh)
                sharding = NamedSharding(self.mesh, PartitionSpec(None, *spec))
                out[key] = jax.make_array_from_process_local_data(sharding, a, global_shape)
            else:
                spec = spec_for(("batch",) + (None,) * (a.ndim - 2), a.shape[1:], self.mesh)
                out[key] = jax.device_put(a, NamedSharding(self.mesh, PartitionSpec(None, *spec)))
        return out

    # ---- the step -----------------------------------------------------------------------------------------
    def loss_fn(self, params: Mapping[str, jax.Array], latents: jax.Array, context: jax.Array,
                key: jax.Array, frozen: nnx.State | None = None) -> jax.Array:
        """The flow-matching loss of one micro-batch (latents as stored, normalised here). ``frozen``: the
        non-trainable variables (default ``split.frozen``; under jit pass them as an argument)."""
        latents = self.normalize(latents)
        noised = self.objective.noise_batch(key, latents, context)
        return self.objective.loss(self.predict(params, noised, frozen), latents, noised)

    def predict(self, params: Mapping[str, jax.Array], noised, frozen: nnx.State | None = None) -> jax.Array:
        model = self.split.merge(params, frozen)
        dtype = self.split.input_dtype()
        with matmul_precision_scope(model):
            return model.forward(noised.noisy.astype(dtype), noised.timesteps, noised.context.astype(dtype))

    def normalize(self, latents: jax.Array) -> jax.Array:
        if self._scale is None:
            return latents.astype(F32)
        mean, inv_std = self._scale
        return (latents.astype(F32) - mean) * inv_std

    def step_fn(self, state: TrainState, frozen: nnx.State, batch: dict[str, jax.Array]):
        """The pure step (what ``step`` jits): ``frozen`` is ``split.frozen``, passed in, not closed over."""
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grad_fn = jax.value_and_grad(self.loss_fn)

        def micro(carry, xs):
            i, latents, context = xs
            loss, grads = grad_fn(state.params, latents, context, jax.random.fold_in(key, i), frozen)
            total, acc = carry
            return (total + loss, jax.tree.map(lambda a, g: a + g.astype(F32), acc, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        xs = (jnp.arange(self.accum), batch["latents"], batch["prompt_embeds"])
        (total, grads), _ = jax.lax.scan(micro, (jnp.zeros((), F32), zeros), xs)
        grads = jax.tree.map(lambda g: g / self.accum, grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": total / self.accum, "grad_norm": optax.tree.norm(grads),
                   "lr": jnp.asarray(self.schedule(state.step), F32)}
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    def jitted_step(self, state: TrainState):
        """``jax.jit(step_fn)`` (built once): the state donated and kept on its shardings (those of ``state``,
        arrays or ``ShapeDtypeStruct``s), the frozen variables an argument on theirs, not donated."""
        if self._step is None:
            shardings = jax.tree.map(lambda a: a.sharding, state)
            self._step = jax.jit(self.step_fn, donate_argnums=0, out_shardings=(shardings, self._replicated()))
        return self._step

    def lower(self, state: TrainState, batch: dict[str, Any]):
        """The step lowered for ``state`` and ``batch`` (arrays or ``ShapeDtypeStruct``s): AOT memory, HLO."""
        with mesh_scope(self.mesh):
            return self.jitted_step(state).lower(state, self.split.frozen, batch)

    def step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer update (jitted once; ``state`` is donated)."""
        with mesh_scope(self.mesh):
            return self.jitted_step(state)(state, self.split.frozen, batch)

    def model(self, state: TrainState) -> nnx.Module:
        """The DiT with the state's parameters in their compute dtypes (for validation and export). fp32 leaves
        are the state's own arrays: use the module before the next ``step`` donates them."""
        return self.split.merge(state.params)
