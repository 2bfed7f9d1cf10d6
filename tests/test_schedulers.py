"""Parity of the functional JAX schedulers with diffusers (torch/diffusers are test-only deps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from fastvideo_jax.schedulers import (  # noqa: E402
    FlowMatchEulerScheduler,
    FlowUniPCMultistepScheduler,
    UniPCState,
)

STEPS = [1, 2, 4, 10, 50]
SHIFTS = [1.0, 3.0, 5.0]
SHAPE = (2, 4, 3, 8, 8)  # (B, C, F, H, W)
TOL = 1e-6  # per-step, float32 outputs
TOL_FREE_RUN = 1e-5  # independent float32 trajectories: rounding of the corrected sample accumulates
TOL_F32_REF = 5e-6  # vs diffusers run in float32: its torch float32 log/expm1 chain is a few ulps off


def _inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)


def fake_model(x: np.ndarray, t: float, w: np.ndarray) -> np.ndarray:
    """Deterministic stand-in for the DiT's velocity prediction."""
    return (np.tanh(x * w) + 0.3 * w - 0.5 * x * (t / 1000.0)).astype(np.float32)


def _max_err(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))))


def _ref_unipc(n: int, f64: bool, **kw):
    ref = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, **kw)
    ref.set_timesteps(n)
    if f64:  # same float32 tables, but diffusers' scalar and tensor math in float64
        ref.sigmas = ref.sigmas.double()
    return ref


def _torch(a: np.ndarray, f64: bool):
    t = torch.from_numpy(np.asarray(a, np.float32))
    return t.double() if f64 else t


def _state_from_ref(ref, i: int) -> UniPCState:
    """Our state holding exactly diffusers' current multistep history."""
    hist = [np.zeros(SHAPE, np.float32) if m is None else m.float().numpy() for m in ref.model_outputs]
    last = np.zeros(SHAPE, np.float32) if ref.last_sample is None else ref.last_sample.float().numpy()
    return UniPCState(step_index=jnp.asarray(i, jnp.int32),
                      lower_order_nums=jnp.asarray(ref.lower_order_nums, jnp.int32),
                      last_order=jnp.asarray(getattr(ref, "this_order", 0), jnp.int32),
                      model_outputs=jnp.asarray(np.stack(hist)), last_sample=jnp.asarray(last))


# --------------------------------------------------------------------------- Euler

@pytest.mark.parametrize("shift", SHIFTS + [7.0, 3.1])
@pytest.mark.parametrize("n", STEPS)
def test_euler_tables_match(n, shift):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(n)
    tables = FlowMatchEulerScheduler(shift=shift).set_timesteps(n)
    np.testing.assert_array_equal(np.asarray(tables.timesteps), ref.timesteps.numpy())
    np.testing.assert_array_equal(np.asarray(tables.sigmas), ref.sigmas.numpy())


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("n", STEPS)
def test_euler_loop_matches(n, shift):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(n)
    sched = FlowMatchEulerScheduler(shift=shift)
    tables = sched.set_timesteps(n)
    state = sched.init_state(tables, SHAPE)
    step = jax.jit(sched.step)
    x, w = _inputs()
    x_ref = x.copy()
    for i, t in enumerate(ref.timesteps):
        assert float(sched.timestep(tables, state)) == float(t)
        v = fake_model(x_ref, float(t), w)
        x_ref = ref.step(_torch(v, False), t, _torch(x_ref, False)).prev_sample.numpy()
        eager, _ = sched.step(tables, state, jnp.asarray(v), jnp.asarray(x))
        x, state = step(tables, state, jnp.asarray(v), jnp.asarray(x))
        err = _max_err(x, x_ref)
        assert err <= TOL, f"Euler n={n} shift={shift} step {i}: max-abs error {err:.3g}"
        if i == 0:  # same float32 ops as torch: bit-exact un-jitted (jit may fuse mul+add to FMA)
            np.testing.assert_array_equal(np.asarray(eager), x_ref)


def test_euler_shift_terminal_matches():
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.1)
    ref.set_timesteps(20)
    tables = FlowMatchEulerScheduler.from_config(dict(ref.config)).set_timesteps(20)
    np.testing.assert_array_equal(np.asarray(tables.timesteps), ref.timesteps.numpy())
    np.testing.assert_array_equal(np.asarray(tables.sigmas), ref.sigmas.numpy())


@pytest.mark.parametrize("shift,terminal", [(7.0, None), (17.0, None), (3.0, 0.1), (1.0, None)])
@pytest.mark.parametrize("n", [1, 6, 50])
def test_euler_explicit_sigmas_match(n, shift, terminal):
    """HunyuanVideo's schedule: diffusers' set_timesteps(sigmas=linspace(1, 0, n + 1)[:-1])."""
    sigmas = np.linspace(1.0, 0.0, n + 1)[:-1]
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift, shift_terminal=terminal)
    ref.set_timesteps(sigmas=sigmas)
    tables = FlowMatchEulerScheduler(shift=shift, shift_terminal=terminal).set_sigmas(sigmas)
    np.testing.assert_array_equal(np.asarray(tables.timesteps), ref.timesteps.numpy())
    np.testing.assert_array_equal(np.asarray(tables.sigmas), ref.sigmas.numpy())
    with pytest.raises(ValueError, match=r"sigmas must be a non-empty 1-D sequence in \[0, 1\]"):
        FlowMatchEulerScheduler(shift=shift).set_sigmas([1.5, 0.5])


# --------------------------------------------------------------------------- UniPC

@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("n", STEPS)
def test_unipc_tables_match(n, shift):
    ref = _ref_unipc(n, False, flow_shift=shift)
    tables = FlowUniPCMultistepScheduler(shift=shift).set_timesteps(n)
    np.testing.assert_array_equal(np.asarray(tables.timesteps), ref.timesteps.numpy())
    np.testing.assert_array_equal(np.asarray(tables.sigmas), ref.sigmas.numpy())


def _run_unipc(n: int, f64: bool, synced: bool, begin_index: int = 0, **kw) -> float:
    """Drive diffusers and ours with identical inputs; return the max-abs error over all steps.

    ``synced``: before each step our state is set to diffusers' history, so each step is compared
    in isolation (otherwise both keep their own multistep state for the whole loop).
    """
    ref = _ref_unipc(n, f64, **kw)
    sched = FlowUniPCMultistepScheduler.from_config(dict(ref.config))
    tables = sched.set_timesteps(n)
    state = sched.init_state(tables, SHAPE, begin_index=begin_index)
    if begin_index:
        ref.set_begin_index(begin_index)
    step = jax.jit(sched.step)
    x, w = _inputs()
    x_ref, worst = x.copy(), 0.0
    for i in range(begin_index, n):
        t = ref.timesteps[i]
        assert int(sched.timestep(tables, state)) == int(t)
        if synced:
            state = _state_from_ref(ref, i)
        v_ref = fake_model(x_ref, float(t), w)
        v = v_ref if synced else fake_model(x, float(t), w)
        x_in = x_ref if synced else x
        out_ref = ref.step(_torch(v_ref, f64), t, _torch(x_ref, f64)).prev_sample.numpy()
        out, state = step(tables, state, jnp.asarray(v), jnp.asarray(x_in))
        err = _max_err(out, out_ref)
        if synced:  # our new history must also match diffusers'
            assert int(state.last_order) == ref.this_order
            assert int(state.lower_order_nums) == ref.lower_order_nums
            err = max(err, _max_err(state.last_sample, ref.last_sample.numpy()),
                      _max_err(state.model_outputs[-1], ref.model_outputs[-1].numpy()))
        worst = max(worst, err)
        x_ref, x = out_ref.astype(np.float32), np.asarray(out)
    return worst


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("n", STEPS)
def test_unipc_every_step_matches_float64_reference(n, shift):
    err = _run_unipc(n, f64=True, synced=True, flow_shift=shift)
    assert err <= TOL, f"UniPC n={n} shift={shift}: max-abs error vs diffusers (float64) {err:.3g}"


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("n", STEPS)
def test_unipc_every_step_matches_float32_diffusers(n, shift):
    # diffusers' own float32 scalar chain (torch float32 log/expm1, ~1 ulp) dominates this error
    err = _run_unipc(n, f64=False, synced=True, flow_shift=shift)
    assert err <= TOL_F32_REF, f"UniPC n={n} shift={shift}: max-abs error vs diffusers (float32) {err:.3g}"


@pytest.mark.parametrize("f64", [True, False], ids=["ref64", "ref32"])
@pytest.mark.parametrize("n", [10, 50])
def test_unipc_free_running_loop(n, f64):
    err = _run_unipc(n, f64=f64, synced=False, flow_shift=3.0)
    assert err <= TOL_FREE_RUN, f"UniPC free-running n={n}: max-abs error {err:.3g}"


@pytest.mark.parametrize("kw", [
    dict(solver_order=1), dict(solver_order=3), dict(solver_type="bh1"),
    dict(disable_corrector=[0, 3]), dict(final_sigmas_type="sigma_min"),
    dict(final_sigmas_type="sigma_min", lower_order_final=False), dict(shift_terminal=0.1),
    dict(begin_index=3),
], ids=str)
def test_unipc_variants_match(kw):
    kw = dict(kw)
    begin = kw.pop("begin_index", 0)
    err = _run_unipc(10, f64=True, synced=True, begin_index=begin, flow_shift=5.0, **kw)
    assert err <= TOL, f"UniPC {kw} begin={begin}: max-abs error {err:.3g}"


# --------------------------------------------------------------------------- jit

@pytest.mark.parametrize("sched", [FlowMatchEulerScheduler(shift=3.0),
                                   FlowUniPCMultistepScheduler(shift=3.0)], ids=["euler", "unipc"])
def test_jit_step_matches_eager_and_traced_once(sched):
    """One trace for the whole loop; jitted == eager up to XLA's mul+add -> FMA contraction.

    XLA:CPU always contracts ``a * b + c`` into an FMA under jit (eager ops are compiled one by
    one), so bit-identity is impossible; the difference is at most an ulp or so.
    """
    traces = 0

    def counted(tables, state, v, x):
        nonlocal traces
        traces += 1
        return sched.step(tables, state, v, x)

    jitted = jax.jit(counted)
    n = 10
    tables = sched.set_timesteps(n)
    x, w = _inputs(1)
    state_e = sched.init_state(tables, SHAPE)
    x_e = jnp.asarray(x)
    worst = 0.0
    for _ in range(n):
        t = float(sched.timestep(tables, state_e))
        v = jnp.asarray(fake_model(np.asarray(x_e), t, w))
        x_j, state_j = jitted(tables, state_e, v, x_e)  # same inputs and state for both
        x_e, state_e = sched.step(tables, state_e, v, x_e)
        worst = max(worst, _max_err(x_j, x_e))
        for a, b in zip(jax.tree_util.tree_leaves(state_j), jax.tree_util.tree_leaves(state_e)):
            assert a.dtype == b.dtype and a.shape == b.shape
            if jnp.issubdtype(a.dtype, jnp.integer):
                assert int(a) == int(b)
            else:
                worst = max(worst, _max_err(a, b))
    assert worst <= TOL, f"jitted vs eager step: max-abs difference {worst:.3g}"
    assert traces == 1, f"step was traced {traces} times"


# --------------------------------------------------------------------------- config

WAN_UNIPC_CONFIG = {
    "_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
    "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True,
    "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
    "solver_order": 2, "solver_p": None, "solver_type": "bh2", "steps_offset": 0, "thresholding": False,
    "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False,
    "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False,
}

EULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.32.0",
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 4096,
    "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 7.0, "shift_terminal": None,
    "use_beta_sigmas": False, "use_dynamic_shifting": False, "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def test_from_config_wan_and_euler():
    assert FlowUniPCMultistepScheduler.from_config(WAN_UNIPC_CONFIG) == FlowUniPCMultistepScheduler(shift=3.0)
    assert FlowMatchEulerScheduler.from_config(EULER_CONFIG) == FlowMatchEulerScheduler(shift=7.0)


@pytest.mark.parametrize("cls, base, key, value", [
    (FlowMatchEulerScheduler, EULER_CONFIG, "use_karras_sigmas", True),
    (FlowMatchEulerScheduler, EULER_CONFIG, "use_dynamic_shifting", True),
    (FlowMatchEulerScheduler, EULER_CONFIG, "stochastic_sampling", True),
    (FlowMatchEulerScheduler, EULER_CONFIG, "invert_sigmas", True),
    (FlowMatchEulerScheduler, EULER_CONFIG, "not_a_diffusers_option", 1),
    (FlowUniPCMultistepScheduler, WAN_UNIPC_CONFIG, "use_karras_sigmas", True),
    (FlowUniPCMultistepScheduler, WAN_UNIPC_CONFIG, "prediction_type", "epsilon"),
    (FlowUniPCMultistepScheduler, WAN_UNIPC_CONFIG, "use_flow_sigmas", False),
    (FlowUniPCMultistepScheduler, WAN_UNIPC_CONFIG, "thresholding", True),
    (FlowUniPCMultistepScheduler, WAN_UNIPC_CONFIG, "predict_x0", False),
])
def test_unsupported_config_raises_naming_key(cls, base, key, value):
    with pytest.raises(ValueError, match=key):
        cls.from_config({**base, key: value})


def test_schedulers_share_helpers_from_a_neutral_module():
    """Config validation and the terminal stretch live in schedulers/_common.py; neither scheduler imports the
    other."""
    import ast

    from fastvideo_jax.schedulers import _common, flow_match_euler, flow_unipc

    for mod, other in ((flow_match_euler, "flow_unipc"), (flow_unipc, "flow_match_euler")):
        tree = ast.parse(open(mod.__file__).read())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert f"fastvideo_jax.schedulers.{other}" not in imported, (mod.__name__, imported)
        assert mod.resolve_config is _common.resolve_config and mod.stretch_to_terminal is _common.stretch_to_terminal
