"""FastWan DMD through the pipeline, and every Wan2.2 / FastWan preset id resolving its pipeline and defaults.

DMD: the pipeline's own run is recorded step by step (the DiT's prediction, the latents in and out); each step
must equal a plain NumPy re-implementation of FastVideo's DMD rule fed the same prediction and noise, the
prediction must be the DiT's own (one conditional forward at the list's timestep: no CFG), and the steps chain.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastvideo_jax.entrypoints.model_spec as model_spec
from fastvideo_jax.configs.models.dits.wanvideo import WAN_PRESETS
from fastvideo_jax.configs.models.vaes.wanvae import WAN_VAE_PRESETS
from fastvideo_jax.configs.pipelines.wan import (
    FastWan21T2V480PConfig, FastWan22TI2V5BConfig, Wan22T2VA14BConfig, Wan22TI2V5BConfig,
)
from fastvideo_jax.entrypoints.model_spec import ModelSpec
from fastvideo_jax.entrypoints.video_generator import VideoGenerator
from fastvideo_jax.errors import UserError
from fastvideo_jax.schedulers.dmd import DmdScheduler
from fastvideo_jax.testing.tiny_pipeline import write_tiny_wan_pipeline
from tests.oracles import dit_call
from tests.test_dmd_scheduler import FastVideoDmdReference

STEPS = (1000, 757, 522)
REQUEST = dict(height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=1.0, seed=11)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return write_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny") / "wan")


@pytest.fixture(scope="module")
def dmd(tiny_root):
    return VideoGenerator.from_pretrained(tiny_root, dmd_denoising_steps=STEPS, flow_shift=8.0)


def test_dmd_pipeline_steps_equal_fastvideo_rule(dmd, monkeypatch):
    from fastvideo_jax.pipelines.wan import WanPipeline

    records = []
    real_step = DmdScheduler.step

    def recording(tables, state, model_output, sample):
        out = real_step(tables, state, model_output, sample)
        t = DmdScheduler.timestep(tables, state)
        jax.debug.callback(lambda *a: records.append([np.asarray(x) for x in a]), state.step_index, t,
                           model_output, sample, out[0])
        return out

    monkeypatch.setattr(DmdScheduler, "step", staticmethod(recording))
    p = dmd.pipeline
    pipe = WanPipeline(p.components, p.config)  # fresh jitted steps, traced with the recording step
    assert isinstance(pipe.scheduler, DmdScheduler) and pipe.scheduler.shift == 8.0
    gen = VideoGenerator(pipe, dmd.defaults, dmd.model_path)
    x_init = np.random.default_rng(4).standard_normal((1, 16, 2, 4, 6)).astype(np.float32)
    out = gen.generate_video("a kite over the sea", latents=x_init, progress=False, **REQUEST)
    jax.effects_barrier()
    records.sort(key=lambda r: int(r[0]))
    assert [int(r[0]) for r in records] == [0, 1, 2] and [float(r[1]) for r in records] == list(STEPS)

    ref = FastVideoDmdReference(8.0)
    context = pipe.encode_text(["a kite over the sea"], None)  # no negative prompt: no CFG
    key = jax.random.key(REQUEST["seed"])
    x = x_init
    for i, (_, t, pred, x_in, x_out) in enumerate(records):
        np.testing.assert_array_equal(x_in, x)  # the steps chain, starting from the given latents
        own = np.asarray(dit_call(pipe.transformer, jnp.asarray(x_in), jnp.full((1,), t), context))
        assert np.abs(pred - own).max() <= 1e-5 * np.abs(own).max()  # the DiT's conditional prediction at t
        noise = np.asarray(jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32))
        expected = ref.step(x_in, pred, t, STEPS[i + 1] if i + 1 < len(STEPS) else None, noise)
        assert np.abs(x_out - expected).max() <= 1e-6, f"step {i}"
        x = x_out
    np.testing.assert_array_equal(np.asarray(out["latents"]), x)


def test_dmd_step_count_and_guidance(dmd, caplog):
    with pytest.raises(UserError, match="samples exactly 3 steps"):
        dmd.generate_video("x", progress=False, **{**REQUEST, "num_inference_steps": 4})
    a = dmd.generate_video("x", progress=False, **REQUEST)["latents"]
    with caplog.at_level("WARNING"):
        b = dmd.generate_video("x", progress=False, **{**REQUEST, "guidance_scale": 5.0})["latents"]
    assert "runs without classifier-free guidance" in caplog.text
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- preset ids -> pipeline and defaults (offline: tiny directories whose configs say what the real ones do) ----
def _layout(tiny_root, dst, *, class_name, dit, vae=None, index=None, transformer_2=False):
    shutil.copytree(tiny_root, dst)
    (dst / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", **dit}))
    if vae is not None:
        (dst / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", **vae}))
    model_index = json.loads((dst / "model_index.json").read_text())
    model_index.update({"_class_name": class_name, **(index or {})})
    if transformer_2:
        shutil.copytree(dst / "transformer", dst / "transformer_2")
        model_index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
    (dst / "model_index.json").write_text(json.dumps(model_index))
    return dst


def _jsonable(d):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


TI2V_DIT = _jsonable(WAN_PRESETS["wan2.2-ti2v-5b"])
WAN22_VAE = _jsonable(WAN_VAE_PRESETS["wan2.2"])
CASES = {
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": dict(
        layout=dict(class_name="WanPipeline", dit=TI2V_DIT, vae=WAN22_VAE,
                    index=dict(expand_timesteps=True, boundary_ratio=None)),
        pipeline="WanPipeline", config=Wan22TI2V5BConfig, components=(),
        expect=dict(expand_timesteps=True, boundary_ratio=None, dmd_denoising_steps=None, flow_shift=5.0),
        sampling=dict(height=704, width=1280, num_frames=121, fps=24, num_inference_steps=50, guidance_scale=5.0)),
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": dict(
        layout=dict(class_name="WanPipeline", dit=_jsonable(WAN_PRESETS["wan2.2-t2v-a14b"]),
                    index=dict(boundary_ratio=0.875, expand_timesteps=False), transformer_2=True),
        pipeline="WanPipeline", config=Wan22T2VA14BConfig, components=("transformer_2",),
        expect=dict(expand_timesteps=False, boundary_ratio=0.875, flow_shift=12.0),
        sampling=dict(height=720, width=1280, num_inference_steps=40, guidance_scale=4.0, guidance_scale_2=3.0)),
    "FastVideo/FastWan2.1-T2V-1.3B-Diffusers": dict(
        layout=dict(class_name="WanDMDPipeline", dit=_jsonable(WAN_PRESETS["wan2.1-t2v-1.3b"])),
        pipeline="WanDMDPipeline", config=FastWan21T2V480PConfig, components=(),
        expect=dict(dmd_denoising_steps=STEPS, flow_shift=8.0, self_attention="video_sparse", vsa_sparsity=0.8),
        sampling=dict(height=448, width=832, num_frames=61, num_inference_steps=3, guidance_scale=1.0)),
    "FastVideo/FastWan2.2-TI2V-5B-Diffusers": dict(
        layout=dict(class_name="WanPipeline", dit=TI2V_DIT, vae=WAN22_VAE),
        pipeline="WanPipeline", config=FastWan22TI2V5BConfig, components=(),
        expect=dict(expand_timesteps=True, dmd_denoising_steps=STEPS, flow_shift=8.0, self_attention="dense"),
        sampling=dict(height=704, width=1280, num_frames=121, num_inference_steps=3, guidance_scale=1.0)),
}


@pytest.mark.parametrize("model_id", sorted(CASES))
def test_preset_id_picks_pipeline_and_defaults(tiny_root, tmp_path, monkeypatch, model_id):
    case = CASES[model_id]
    root = _layout(tiny_root, tmp_path / "m", **case["layout"])
    resolved = []
    monkeypatch.setattr(model_spec, "resolve_model_path", lambda m: resolved.append(m) or root)
    spec = ModelSpec.open(model_id)
    assert resolved == [model_id]
    assert spec.pipeline_cls.__name__ == case["pipeline"] and type(spec.config) is case["config"]
    assert {k: getattr(spec.config, k) for k in case["expect"]} == case["expect"]
    assert {k: getattr(spec.defaults, k) for k in case["sampling"]} == case["sampling"]
    assert set(case["components"]) <= set(spec.components)
    assert ("transformer_2" in spec.components) == ("transformer_2" in case["components"])
    spec.sampling_param(prompt="x")  # the preset's own request passes the pipeline's checks
