"""FastWan's DMD sampler vs a plain NumPy re-implementation of FastVideo's rule (``DmdDenoisingStage`` with
``pred_noise_to_pred_video`` and ``FlowMatchEulerDiscreteScheduler.add_noise``) on the same model outputs and
noise; its training table vs diffusers' FlowMatchEulerDiscreteScheduler (the same constructor FastVideo copies)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastvideo_jax.errors import UserError
from fastvideo_jax.schedulers import DmdScheduler, FlowMatchEulerScheduler, FlowUniPCMultistepScheduler
from fastvideo_jax.schedulers.dmd import training_table

SHAPE = (2, 4, 3, 6, 10)  # (B, C, F, H, W)
TOL = 1e-6


class FastVideoDmdReference:
    """FastVideo's DMD arithmetic, written out in NumPy: the stage's scheduler is a fresh
    FlowMatchEulerDiscreteScheduler(shift=8.0) whose *training* table (never set_timesteps) is searched for the
    nearest timestep; x0 is computed in float64 and cast back, the re-noise in float32."""

    def __init__(self, shift: float = 8.0, n: int = 1000):
        s = np.linspace(1, n, n, dtype=np.float32)[::-1].copy() / np.float32(n)
        self.sigmas = (np.float32(shift) * s / (1 + np.float32(shift - 1) * s)).astype(np.float32)
        self.timesteps = (self.sigmas * np.float32(n)).astype(np.float32)

    def sigma(self, t: float) -> np.float32:
        return self.sigmas[np.argmin(np.abs(self.timesteps.astype(np.float64) - float(t)))]

    def step(self, x, pred, t, next_t, noise):
        x0 = (x.astype(np.float64) - np.float64(self.sigma(t)) * pred.astype(np.float64)).astype(pred.dtype)
        if next_t is None:
            return x0
        sigma = self.sigma(next_t)
        return ((1 - sigma) * x0 + sigma * noise).astype(np.float32)


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("shift", [8.0, 5.0, 3.0])
def test_training_table_matches_diffusers(shift):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    timesteps, sigmas = training_table(shift)
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())


@pytest.mark.parametrize("steps, shift", [((1000, 757, 522), 8.0), ((1000, 757, 522), 5.0),
                                          ((1000, 750, 500, 250), 8.0), ((999,), 8.0)])
def test_schedule_matches_fastvideo(steps, shift):
    tables = DmdScheduler(steps, shift).set_timesteps(len(steps))
    ref = FastVideoDmdReference(shift)
    np.testing.assert_array_equal(np.asarray(tables.timesteps), np.asarray(steps, np.float32))
    np.testing.assert_array_equal(np.asarray(tables.sigmas), np.array([ref.sigma(t) for t in steps] + [0], np.float32))
    assert 0 < abs(float(tables.sigmas[1]) - steps[1] / 1000) < 1e-3 if len(steps) > 1 else True


def test_steps_match_fastvideo_rule():
    """Every step (and the whole loop) equals the reference fed the same model outputs and the same noise."""
    steps = (1000, 757, 522)
    sched = DmdScheduler(steps, 8.0)
    tables = sched.set_timesteps(3)
    state = sched.init_state(tables, SHAPE, key=7)
    ref = FastVideoDmdReference(8.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    x_ref = x.copy()
    step = jax.jit(sched.step)
    for i, t in enumerate(steps):
        assert float(sched.timestep(tables, state)) == t
        pred = (1.3 * rng.standard_normal(SHAPE) + 0.2 * x_ref).astype(np.float32)  # the same model outputs
        noise = np.asarray(jax.random.normal(jax.random.fold_in(state.key, i), SHAPE, jnp.float32))
        next_t = steps[i + 1] if i + 1 < len(steps) else None
        expected = ref.step(x_ref, pred, t, next_t, noise)
        one = step(tables, state, jnp.asarray(pred), jnp.asarray(x_ref))[0]  # this step alone, from the same input
        assert _max_err(one, expected) <= TOL, f"step {i}: {_max_err(one, expected):.2e}"
        x, state = step(tables, state, jnp.asarray(pred), x)  # the running loop
        x_ref = expected
        assert _max_err(x, x_ref) <= TOL, f"loop after step {i}: {_max_err(x, x_ref):.2e}"
    assert int(state.step_index) == 3


def test_last_step_returns_x0_exactly():
    sched = DmdScheduler((1000, 757), 8.0)
    tables = sched.set_timesteps(2)
    state = sched.init_state(tables, key=0)._replace(step_index=jnp.asarray(1, jnp.int32))
    x = jnp.linspace(-2, 2, 60, dtype=jnp.float32).reshape(1, 1, 1, 6, 10)
    v = jnp.cos(x)
    out, _ = sched.step(tables, state, v, x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x - tables.sigmas[1] * v))


def test_noise_is_keyed_per_step_and_seed():
    sched = DmdScheduler((1000, 757, 522), 8.0)
    tables = sched.set_timesteps(3)
    x = jnp.zeros(SHAPE, jnp.float32)  # x0 = 0: the output is sigma_next * noise
    def noise(seed, i):
        state = sched.init_state(tables, key=seed)._replace(step_index=jnp.asarray(i, jnp.int32))
        return np.asarray(sched.step(tables, state, x, x)[0]) / float(tables.sigmas[i + 1])
    a0, a1, b0 = noise(3, 0), noise(3, 1), noise(4, 0)
    np.testing.assert_array_equal(a0, noise(3, 0))
    np.testing.assert_array_equal(noise(3, 0), noise(jax.random.key(3), 0))  # a seed and its key agree
    assert not np.allclose(a0, a1) and not np.allclose(a0, b0)
    assert abs(a0.std() - 1) < 0.1 and abs(a0.mean()) < 0.1


def test_step_compiles_once_with_traced_index():
    sched = DmdScheduler((1000, 757, 522), 8.0)
    tables = sched.set_timesteps(3)
    traces = []

    @jax.jit
    def step(tables, state, v, x):
        traces.append(1)
        return sched.step(tables, state, v, x)

    state = sched.init_state(tables, SHAPE, key=1)
    x = jnp.ones(SHAPE, jnp.float32)
    for _ in range(3):
        x, state = step(tables, state, x, x)
    assert len(traces) == 1


def test_bad_inputs_are_clear():
    with pytest.raises(UserError, match=r"num_inference_steps=50: this DMD model samples exactly 3 steps"):
        DmdScheduler((1000, 757, 522)).set_timesteps(50)
    with pytest.raises(UserError, match="dmd_denoising_steps must be strictly decreasing"):
        DmdScheduler((522, 757))
    with pytest.raises(UserError, match="shift must be > 0"):
        DmdScheduler((1000,), shift=0.0)
    sched = DmdScheduler()
    with pytest.raises(ValueError, match="needs key="):
        sched.init_state(sched.set_timesteps(3), SHAPE)
    with pytest.raises(TypeError, match="typed key"):
        sched.init_state(sched.set_timesteps(3), SHAPE, key=jnp.zeros(2, jnp.uint32))


def test_other_schedulers_accept_a_key():
    """One denoising stage can pass key= to any scheduler."""
    euler = FlowMatchEulerScheduler(shift=3.0)
    euler.init_state(euler.set_timesteps(4), SHAPE, key=jax.random.key(0))
    unipc = FlowUniPCMultistepScheduler()
    unipc.init_state(unipc.set_timesteps(4), SHAPE, key=jax.random.key(0))
