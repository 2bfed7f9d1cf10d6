"""TeaCache (FastVideo's rule for Wan) on a tiny fp32 Wan DiT: off is exact, the skip pattern equals a literal
numpy port of FastVideo's stateful hooks on the same trajectory, a skipped step is input + cached residual, a
half that skips alone gets its residual while the other computes, and nothing retraces."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fastvideo_jax.pipelines.stages.denoising as denoising
from fastvideo_jax.configs.models.dits.wanvideo import WanVideoConfig, wan_preset
from fastvideo_jax.configs.sample import SamplingParam
from fastvideo_jax.errors import UserError
from fastvideo_jax.models.dits import teacache
from fastvideo_jax.models.dits.teacache import WAN_TEACACHE_PRESETS, WanTeaCacheParams
from fastvideo_jax.models.dits.wanvideo import WanTransformer3DModel
from fastvideo_jax.pipelines.stages import DenoisingStage
from fastvideo_jax.pipelines.stages.timesteps import pad_tables
from fastvideo_jax.schedulers.flow_unipc import FlowUniPCMultistepScheduler
from fastvideo_jax.testing.tiny_pipeline import UNIPC_FLOW_CONFIG

SHAPE = (1, 16, 3, 4, 6)  # latents (B, C, F, H, W)
STEPS = 16


class FastVideoTeaCache:
    """FastVideo's ``WanTransformer3DModel.should_skip_forward_for_cached_states`` (before its removal in #1121),
    transcribed with its state: one call per cond / uncond pass, counter reset on every call at step 0."""

    def __init__(self, coefficients, thresh, use_ret_steps, num_steps):
        self.coefficients, self.thresh = coefficients, thresh
        self.ret_steps = 10 if use_ret_steps else 2
        self.cutoff_steps = 2 * num_steps if use_ret_steps else 2 * num_steps - 2
        self.cnt = 0
        self.previous = {True: None, False: None}
        self.accumulated = {True: 0.0, False: 0.0}
        self.margins = []  # |accumulated - thresh| at every evaluated decision

    def should_skip(self, current_timestep: int, modulated: np.ndarray) -> bool:
        if current_timestep == 0:
            self.cnt = 0
        even = self.cnt % 2 == 0
        if self.cnt < self.ret_steps or self.cnt >= self.cutoff_steps:
            calc = True
            self.accumulated[even] = 0.0
        else:
            prev = self.previous[even]
            rel = np.abs(modulated - prev).mean() / np.abs(prev).mean()
            self.accumulated[even] += np.poly1d(self.coefficients)(rel)
            self.margins.append(abs(self.accumulated[even] - self.thresh))
            calc = not self.accumulated[even] < self.thresh
            if calc:
                self.accumulated[even] = 0.0
        self.previous[even] = modulated.copy()
        self.cnt += 1
        return not calc


def _noised(model, seed=7, scale=0.1):
    """Noise on every parameter (zero-initialised biases would hide mistakes)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def noise(state):
        leaves, tree = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        return jax.tree.unflatten(tree, [a + scale * jax.random.normal(k, a.shape, a.dtype)
                                         for a, k in zip(leaves, keys)])

    return nnx.merge(graphdef, noise(state))


@pytest.fixture(scope="module")
def pipe():
    config = WanVideoConfig(arch_config=wan_preset("tiny"), precision="fp32")
    with nnx.use_eager_sharding(False):
        dit = _noised(WanTransformer3DModel(config, rngs=nnx.Rngs(0)))
    return DenoisingStage(dit, FlowUniPCMultistepScheduler.from_config(UNIPC_FLOW_CONFIG), progress=False)


def _fresh(stage):
    """A new stage on the same DiT (its own jitted steps, so a monkeypatched step function is picked up)."""
    return DenoisingStage(stage.transformer, stage.scheduler, progress=False)


def _inputs(cfg: bool, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    latents = jax.random.normal(k1, SHAPE)
    context = jax.random.normal(k2, ((2 if cfg else 1) * SHAPE[0], 7, 32))
    return latents, context


def _denoise(pipe, cfg, thresh, steps=STEPS, guidance=5.0, preset=None, monkeypatch=None):
    if preset is not None:
        monkeypatch.setattr(type(pipe.transformer), "teacache_params", lambda self, model_id="": preset)
    latents, context = _inputs(cfg)
    tables = pad_tables(pipe.scheduler.set_timesteps(steps), steps)
    out = pipe.denoise(latents, {"encoder_hidden_states": context}, tables, steps, guidance, do_cfg=cfg,
                       teacache_thresh=thresh)
    return np.asarray(out), pipe.last_teacache


def _timesteps(pipe, steps):
    tables = pipe.scheduler.set_timesteps(steps)
    return np.asarray(tables.timesteps)[:steps]


def _modulated(pipe, cfg, steps, use_ret_steps):
    """Each step's modulated inputs from the DiT's own embedding, per call (cond, then uncond)."""
    latents, context = _inputs(cfg)
    x = jnp.concatenate([latents, latents]) if cfg else latents
    graphdef, state = nnx.split(pipe.transformer)

    @jax.jit
    def embed(state, t):
        emb = nnx.merge(graphdef, state).embed(x, jnp.broadcast_to(t, (x.shape[0],)), context)
        return emb.temb_proj if use_ret_steps else emb.temb

    per_step = [np.asarray(embed(state, t), np.float64) for t in _timesteps(pipe, steps)]
    b = SHAPE[0]
    return [[m[:b], m[b:]] if cfg else [m] for m in per_step]


def _oracle(pipe, cfg, steps, preset: WanTeaCacheParams, thresh):
    oracle = FastVideoTeaCache(preset.coefficients, thresh, preset.use_ret_steps, steps)
    pattern = np.zeros((steps, 2), bool)
    for i, calls in enumerate(_modulated(pipe, cfg, steps, preset.use_ret_steps)):
        skips = [oracle.should_skip(i, m) for m in calls]
        if cfg:
            pattern[i] = skips
        else:
            pattern[i, i % 2] = skips[0]
    return pattern, oracle.margins


# A linear rescaling (accumulated = sum of relative distances; the tiny model's are 0.3 to 1.5 per step) with a
# threshold of 1 gives a mixed pattern; the shipped Wan polynomials are fitted to real models' distances.
LINEAR = (0.0, 0.0, 0.0, 1.0, 0.0)


@pytest.mark.parametrize("cfg", [True, False])
def test_threshold_zero_is_exactly_no_cache(pipe, cfg, monkeypatch):
    """The cached step at threshold 0 gives the plain step's latents bit for bit (same executable path)."""
    plain, report = _denoise(pipe, cfg, 0.0)
    assert report is None
    real = denoising._cached_denoise_step

    def at_zero(graphdef, scheduler, use_cfg, dtype, dit_state, latents, sched_state, cache, runtime, *rest, **kw):
        return real(graphdef, scheduler, use_cfg, dtype, dit_state, latents, sched_state, cache,
                    dataclasses.replace(runtime, thresh=jnp.zeros_like(runtime.thresh)), *rest, **kw)

    monkeypatch.setattr(denoising, "_cached_denoise_step", at_zero)
    cached, report = _denoise(_fresh(pipe), cfg, 0.5)  # takes the cached path; the threshold inside is 0
    assert report["skipped_calls"] == 0
    np.testing.assert_array_equal(cached, plain)


@pytest.mark.parametrize("use_ret_steps", [True, False])
@pytest.mark.parametrize("cfg", [True, False])
def test_skip_pattern_equals_fastvideo_rule(pipe, cfg, use_ret_steps, monkeypatch):
    preset = WanTeaCacheParams(0.0, use_ret_steps, LINEAR, LINEAR)
    thresh = 1.0
    expected, margins = _oracle(pipe, cfg, STEPS, preset, thresh)
    assert min(margins) > 1e-4, "a decision this close to the threshold would be decided by rounding"
    assert 0 < expected.sum() < len(margins), "the trajectory must both skip and compute"
    _, report = _denoise(pipe, cfg, thresh, preset=preset, monkeypatch=monkeypatch)
    np.testing.assert_array_equal(report["pattern"], expected)
    forwards = expected.all(1) if cfg else expected.any(1)
    assert report["skipped_steps"] == list(np.flatnonzero(forwards))


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"])
def test_shipped_presets_follow_fastvideo_rule(pipe, name, monkeypatch):
    preset = WAN_TEACACHE_PRESETS[name]
    thresh = preset.recommended_thresh
    expected, margins = _oracle(pipe, True, STEPS, preset, thresh)
    assert min(margins) > 1e-4
    _, report = _denoise(pipe, True, thresh, preset=preset, monkeypatch=monkeypatch)
    np.testing.assert_array_equal(report["pattern"], expected)


def _cached_call(model, cfg):
    """One jitted cached forward with what to compare it against: (output, new cache, the head on tokens + the
    residual cached before this step, the plain forward, the tokens)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, cache, runtime, x, t, context):
        m = nnx.merge(graphdef, state)
        emb = m.embed(x, t, context)
        out, new = m.cached_forward(cache, runtime, x, t, context, cfg=cfg)
        before = teacache.residual_for_batch(dataclasses.replace(cache, step=cache.step + 1), cfg)
        return out, new, m.head(emb.x + before, emb), m.forward(x, t, context), emb.x

    return lambda *args: run(state, *args)


def test_skipped_step_is_input_plus_cached_residual(pipe):
    model = pipe.transformer
    preset = WanTeaCacheParams(0.0, True, LINEAR, LINEAR)
    runtime = preset.runtime(1.0, STEPS)
    latents, context = _inputs(True)
    x = jnp.concatenate([latents, latents])
    cache = model.init_teacache_state(SHAPE, jnp.float32, cfg=True, use_ret_steps=True)
    seen = set()
    call = _cached_call(model, cfg=True)
    for t in _timesteps(pipe, STEPS):
        out, new, stand_in, plain, tokens = call(cache, runtime, x, jnp.full((2,), t), context)
        for half, skip in enumerate(np.asarray(new.skipped[int(cache.step)])):
            rows = slice(half, half + 1)  # batch 1: row 0 = cond, row 1 = uncond
            if skip:
                np.testing.assert_allclose(out[rows], stand_in[rows], atol=1e-5, rtol=0)
                np.testing.assert_array_equal(new.residual[rows], cache.residual[rows])  # kept, not re-derived
            else:
                np.testing.assert_allclose(out[rows], plain[rows], atol=1e-5, rtol=0)
            seen.add(bool(skip))
        cache = new
    assert seen == {True, False}


def test_one_half_skipping_alone_gets_its_residual(pipe):
    """A cache where only the cond half is below the threshold: the blocks run, the cond rows are input +
    cond residual and keep it, the uncond rows are the plain forward's and store their new residual."""
    model = pipe.transformer
    preset = WanTeaCacheParams(0.0, True, LINEAR, LINEAR)
    runtime = preset.runtime(1.0, STEPS)
    latents, context = _inputs(True)
    x = jnp.concatenate([latents, latents])
    ts = _timesteps(pipe, STEPS)
    cache = model.init_teacache_state(SHAPE, jnp.float32, cfg=True, use_ret_steps=True)
    call = _cached_call(model, cfg=True)
    for t in ts[:6]:  # past the retention steps of both halves
        cache = call(cache, runtime, x, jnp.full((2,), t), context)[1]
    cache = dataclasses.replace(cache, accumulated=jnp.array([0.0, 10.0]))
    out, new, stand_in, plain, tokens = call(cache, runtime, x, jnp.full((2,), ts[6]), context)
    np.testing.assert_array_equal(new.skipped[6], [True, False])
    np.testing.assert_allclose(out[:1], stand_in[:1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[1:], plain[1:], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(new.residual[:1], cache.residual[:1])
    assert not np.allclose(new.residual[1:], cache.residual[1:])
    np.testing.assert_array_equal(new.accumulated[1], 0.0)


def test_steps_guidance_threshold_do_not_retrace(pipe, monkeypatch):
    traces = []
    real = denoising._cached_denoise_step

    def counting(*args, **kwargs):
        traces.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(denoising, "_cached_denoise_step", counting)
    fresh = _fresh(pipe)
    for steps, guidance, thresh in [(4, 5.0, 0.1), (7, 3.0, 0.3), (12, 7.5, 0.05)]:
        _, report = _denoise(fresh, True, thresh, steps=steps, guidance=guidance)
        assert report["steps"] == steps
    assert traces == [True], f"traced {len(traces)} times"


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_threshold_is_a_clear_error(pipe, bad):
    with pytest.raises(UserError, match="teacache_thresh"):
        SamplingParam(prompt="a cat", teacache_thresh=bad).validate()
    with pytest.raises(UserError, match="teacache_thresh"):
        _denoise(pipe, True, bad, steps=2)


def test_presets_are_fastvideos():
    small, large = WAN_TEACACHE_PRESETS["wan2.1-t2v-1.3b"], WAN_TEACACHE_PRESETS["wan2.1-t2v-14b"]
    assert (small.recommended_thresh, small.use_ret_steps, small.ret_steps) == (0.08, True, 10)
    assert (large.recommended_thresh, large.use_ret_steps, large.ret_steps) == (0.20, False, 2)
    assert small.coefficients[0] == pytest.approx(-5.21862437e04)
    assert large.coefficients[0] == pytest.approx(-5784.54975374)
    assert small.cutoff_steps(50) == 100 and large.cutoff_steps(50) == 98
    assert teacache.wan_teacache_preset(1536) == "wan2.1-t2v-1.3b"
    assert teacache.wan_teacache_preset(5120) == "wan2.1-t2v-14b"
    assert teacache.wan_teacache_preset(5120, 1280, "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers") == "wan2.1-i2v-14b-720p"
    assert teacache.wan_teacache_preset(5120, 1280) == "wan2.1-i2v-14b-480p"


def test_unsupported_pipelines_refuse_teacache_before_work(pipe):
    """Per-token timesteps (Wan2.2 TI2V) and two experts (A14B) have no FastVideo TeaCache: a UserError, not a
    silently wrong cache."""
    stage = DenoisingStage(pipe.transformer, pipe.scheduler, progress=False, expand_timesteps=True)
    with pytest.raises(UserError, match="per-token timesteps"):
        _denoise(stage, True, 0.1, steps=2)
    stage = DenoisingStage(pipe.transformer, pipe.scheduler, progress=False, transformer_2=pipe.transformer,
                           boundary_ratio=0.9)
    with pytest.raises(UserError, match="two experts"):
        _denoise(stage, True, 0.1, steps=2)
    assert stage._steps == {}  # nothing compiled


def test_on_a_mesh_equals_one_device_and_compiles_once(tmp_path, count_compiles):
    """data=2 (cond / uncond halves and their cache slots on different devices), sequence=4 with padded tokens
    (6 tokens -> 8): the same skipped steps and latents as one device; a second request compiles nothing."""
    import shutil

    from fastvideo_jax.configs.models.dits.wanvideo import WAN_PRESETS
    from fastvideo_jax.configs.models.encoders.t5 import T5_PRESETS
    from fastvideo_jax.entrypoints.video_generator import VideoGenerator
    from fastvideo_jax.testing.tiny_checkpoints import write_random_component
    from fastvideo_jax.testing.tiny_pipeline import write_tiny_wan_pipeline

    root = write_tiny_wan_pipeline(tmp_path / "tiny")
    shutil.rmtree(root / "transformer")
    arch = {**WAN_PRESETS["tiny"], "text_dim": T5_PRESETS["tiny"]["d_model"], "num_attention_heads": 4}
    write_random_component(root / "transformer", WanTransformer3DModel, "WanTransformer3DModel", arch, seed=5)
    request = dict(height=16, width=48, num_frames=5, num_inference_steps=12, guidance_scale=4.0, seed=7,
                   negative_prompt="blurry", teacache_thresh=0.08)
    fp32 = dict(dit_precision="fp32", vae_decode_precision="fp32")
    ref = VideoGenerator.from_pretrained(root, mesh="data=1", **fp32).generate_video("a cat", progress=False, **request)
    gen = VideoGenerator.from_pretrained(root, mesh="data=2,sequence=4", **fp32)
    out = gen.generate_video("a cat", progress=False, **request)
    assert ref["teacache"]["skipped_steps"], "the request must skip some steps"
    assert out["teacache"]["skipped_steps"] == ref["teacache"]["skipped_steps"]
    np.testing.assert_array_equal(out["teacache"]["pattern"], ref["teacache"]["pattern"])
    err = np.abs(np.asarray(out["latents"]) - np.asarray(ref["latents"])).max()
    assert err <= 1e-4 * np.abs(np.asarray(ref["latents"])).max()
    with count_compiles() as n:
        gen.generate_video("a dog", progress=False, **dict(request, teacache_thresh=0.2, guidance_scale=6.0))
    assert n[0] == 0, f"{n[0]} compilations"


def test_cli_flag(tmp_path, monkeypatch, capsys):
    """``--teacache-thresh`` reaches the pipeline (the run reports what it skipped); a bad value is one line,
    exit 2, before any model is looked up."""
    from fastvideo_jax.entrypoints.cli import main

    monkeypatch.setenv("FASTVIDEO_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTVIDEO_JAX_DEBUG", raising=False)
    out = tmp_path / "tiny.mp4"
    base = ["generate", "--model", "tiny-wan", "--prompt", "a robot", "--height", "32", "--width", "32",
            "--num-frames", "5", "--num-inference-steps", "8", "--output", str(out), "--no-progress"]
    assert main([*base, "--teacache-thresh", "0.08"]) == 0
    assert "teacache: blocks skipped on 2 of 8 steps" in capsys.readouterr().out  # steps 6, 7: past ret-steps
    assert main([*base[:2], "/nonexistent", *base[3:], "--teacache-thresh", "nan"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: teacache_thresh must be finite") and err.count("\n") == 1
