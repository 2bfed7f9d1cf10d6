"""Pure-functional flow-matching schedulers whose ``step`` runs under ``jax.jit``.

Pattern (both schedulers)::

    tables = sched.set_timesteps(num_inference_steps)      # Python int -> pytree of arrays
    state = sched.init_state(tables, sample_shape, key=key)  # pytree of fixed-shape arrays (key: DMD's noise)
    t = sched.timestep(tables, state)                        # model conditioning timestep
    prev_sample, state = sched.step(tables, state, model_output, sample)  # jittable
"""

from fastvideo_jax.schedulers.dmd import DmdScheduler, DmdState, DmdTables
from fastvideo_jax.schedulers.flow_match_euler import EulerState, EulerTables, FlowMatchEulerScheduler
from fastvideo_jax.schedulers.flow_unipc import FlowUniPCMultistepScheduler, UniPCState, UniPCTables

__all__ = [
    "DmdScheduler",
    "DmdState",
    "DmdTables",
    "EulerState",
    "EulerTables",
    "FlowMatchEulerScheduler",
    "FlowUniPCMultistepScheduler",
    "UniPCState",
    "UniPCTables",
]
