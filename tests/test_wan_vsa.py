"""Video sparse attention in the Wan DiT (FastWan): ``to_gate_compress`` loads from a FastWan-layout checkpoint,
the VSA DiT equals the same DiT with its self-attention replaced by the dense oracle (dense softmax + gated
coarse term at sparsity 0, the selection's token mask otherwise), a zero gate at sparsity 0 is the dense DiT, a
run-time sparsity does not recompile, and mismatched checkpoints / sparsities are named errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters import ConversionError
from fastvideo_jax.attention.video_sparse import vsa_selection
from fastvideo_jax.errors import UserError
from fastvideo_jax.models.dits import wanvideo
from fastvideo_jax.models.loader.component_loader import TransformerLoader
from fastvideo_jax.models.loader.safetensors_io import SafetensorsCheckpoint, save_safetensors
from fastvideo_jax.testing import write_random_dit
from tests.oracles import dit_call, vsa_dense_oracle

WEIGHTS = "diffusion_pytorch_model.safetensors"
DIM = 24  # tiny preset: 2 heads x 12
GRID = (5, 5, 6)  # latents (5, 10, 12) / patch (1, 2, 2): 8 cubes, ragged in every direction


def _with_gates(src, dst, scale: float, seed: int = 7):
    """A FastWan-layout copy of a tiny checkpoint: every block gets ``blocks.N.to_gate_compress.{weight,bias}``
    (PyTorch Linear layout), ``scale`` times standard normal."""
    rng = np.random.default_rng(seed)
    dst.mkdir(parents=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    ckpt = SafetensorsCheckpoint.from_dir(src)
    tensors = {k: np.array(ckpt.array(k)) for k in ckpt}
    gates = {}
    for i in range(2):
        gates[f"blocks.{i}.to_gate_compress.weight"] = (scale * rng.standard_normal((DIM, DIM))).astype(np.float32)
        gates[f"blocks.{i}.to_gate_compress.bias"] = (scale * rng.standard_normal(DIM)).astype(np.float32)
    save_safetensors(dst / WEIGHTS, {**tensors, **gates})
    return gates


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("vsa")
    plain = write_random_dit(root / "plain", seed=3)
    gates = _with_gates(plain, root / "fastwan", 0.5)
    _with_gates(plain, root / "zero_gate", 0.0)
    return plain, root / "fastwan", root / "zero_gate", gates


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 16, 5, 10, 12)), jnp.float32)
    return x, jnp.asarray([700.0, 20.0]), jnp.asarray(rng.standard_normal((2, 7, 32)), jnp.float32)


def _vsa(d, sparsity):
    return TransformerLoader().load(d, precision="fp32", attention_backend="video_sparse_attn", vsa_sparsity=sparsity)


def test_gate_weights_load_through_the_mapping(ckpts):
    _, fastwan, _, gates = ckpts
    model = _vsa(fastwan, 0.5)
    kernel = np.asarray(model.blocks.to_gate_compress.kernel[...])  # (layers, in, out)
    bias = np.asarray(model.blocks.to_gate_compress.bias[...])
    for i in range(2):
        np.testing.assert_array_equal(kernel[i], gates[f"blocks.{i}.to_gate_compress.weight"].T)
        np.testing.assert_array_equal(bias[i], gates[f"blocks.{i}.to_gate_compress.bias"])


def _oracle_forward(model, inputs, monkeypatch, sparsity):
    """The model's traced forward (eager, no jit cache) with its VSA op replaced by the dense oracle."""

    def oracle_attend(vsa, head_dim, backend=None):
        def attend(q, k, vg, kv_mask):
            v, gate = vg[..., :head_dim], vg[..., head_dim:]
            sel, count = vsa_selection(q, k, grid=vsa.grid, sparsity=sparsity)
            return vsa_dense_oracle(q, k, v, gate, vsa.grid, sel, count)
        return attend

    monkeypatch.setattr(wanvideo, "video_sparse_attend", oracle_attend)
    x, t, ctx = inputs
    return model.forward(x, t, ctx)


@pytest.mark.parametrize("sparsity", [0.0, 0.6])
def test_vsa_dit_equals_dense_oracle(ckpts, inputs, monkeypatch, sparsity):
    """At sparsity 0 the oracle is dense attention plus the gated cube-mean attention (no selection at all); at
    0.6 the dense softmax under the selection's token mask plus the gated term."""
    model = _vsa(ckpts[1], sparsity)
    got = np.asarray(dit_call(model, *inputs))
    want = np.asarray(_oracle_forward(model, inputs, monkeypatch, sparsity))
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_zero_gate_at_sparsity_zero_is_the_dense_dit(ckpts, inputs):
    plain, _, zero_gate, _ = ckpts
    dense = np.asarray(dit_call(TransformerLoader().load(plain, precision="fp32"), *inputs))
    vsa = np.asarray(dit_call(_vsa(zero_gate, 0.0), *inputs))
    assert np.abs(vsa - dense).max() <= 1e-4 * max(1.0, np.abs(dense).max())
    gated = np.asarray(dit_call(_vsa(ckpts[1], 0.0), *inputs))
    assert np.abs(gated - dense).max() > 1e-2  # the gated coarse term is there


def test_runtime_sparsity_does_not_recompile(ckpts, inputs, count_compiles):
    model = _vsa(ckpts[1], 0.5)
    base = dit_call(model, *inputs)
    with count_compiles() as n:
        at_75 = dit_call(model, *inputs, vsa_sparsity=0.75)
        again = dit_call(model, *inputs, vsa_sparsity=0.5)
    assert n[0] == 0
    np.testing.assert_array_equal(np.asarray(again), np.asarray(base))
    static = dit_call(_vsa(ckpts[1], 0.75), *inputs)
    assert float(jnp.abs(at_75 - static).max()) <= 1e-5 * max(1.0, float(jnp.abs(static).max()))
    with pytest.raises(UserError, match="below the model's vsa_sparsity=0.5"):
        dit_call(model, *inputs, vsa_sparsity=0.25)
    with pytest.raises(UserError, match="vsa_sparsity needs attention_backend"):
        dit_call(TransformerLoader().load(ckpts[0], precision="fp32"), *inputs, vsa_sparsity=0.5)


def test_mismatched_checkpoints_name_the_gate(ckpts):
    plain, fastwan, _, _ = ckpts
    with pytest.raises(ConversionError, match=r"(?s)blocks\.0\.to_gate_compress\.weight.*video_sparse_attn"):
        TransformerLoader().load(fastwan, precision="fp32")  # a FastWan checkpoint into a dense DiT
    with pytest.raises(ConversionError, match=r"(?s)to_gate_compress.*FastWan"):
        _vsa(plain, 0.5)  # a VSA DiT from a checkpoint without gates
    with pytest.raises(UserError, match="sparsity"):
        _vsa(fastwan, 1.0)
    with pytest.raises(UserError, match="exclude each other"):
        TransformerLoader().load(fastwan, precision="fp32", attention_backend="video_sparse",
                                 self_attention_backend="sliding_tile", sta_window=(1, 1, 1))


def test_fastwan_pipeline_loads_its_dit_with_video_sparse_attention(tmp_path):
    """Pipeline config -> DiT: self_attention='video_sparse' loads the transformer (gates included) with VSA at
    the configured sparsity, and a DMD request runs end to end."""
    from fastvideo_jax.entrypoints.video_generator import VideoGenerator
    from fastvideo_jax.testing.tiny_pipeline import write_tiny_wan_pipeline

    root = write_tiny_wan_pipeline(tmp_path / "wan")
    plain = tmp_path / "plain"
    (root / "transformer").rename(plain)
    _with_gates(plain, root / "transformer", 0.5)
    gen = VideoGenerator.from_pretrained(root, self_attention="video_sparse", vsa_sparsity=0.5,
                                         dmd_denoising_steps=(1000, 757, 522), flow_shift=8.0)
    dit = gen.pipeline.transformer
    assert dit.config.vsa_sparsity == 0.5 and dit.blocks.to_gate_compress is not None
    out = gen.generate_video("a kite", progress=False, height=32, width=48, num_frames=5, num_inference_steps=3,
                             guidance_scale=1.0, seed=1)
    assert out["frames"].shape == (5, 32, 48, 3)


def test_sequence_parallel_equals_one_device():
    """Ulysses: the gate goes through the all-to-all with v, and the sequence padding (75 tokens over sp = 2 and 4)
    is cut off before the op; every mesh gives the one-device output."""
    from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh
    from tests.test_parallel_dit import _inputs as mesh_inputs
    from tests.test_parallel_dit import _model, _rel, _run_on

    model = _model(attention_backend="video_sparse_attn", vsa_sparsity=0.5)
    assert model.blocks.to_gate_compress is not None
    inputs = mesh_inputs(2, 5, 10, 6)  # grid (5, 5, 3): 75 tokens in 4 ragged cubes
    ref = _run_on(model, None, inputs)
    for config in (MeshConfig(data=2, sequence=2), MeshConfig(tensor=2, sequence=4)):
        assert _rel(_run_on(model, make_mesh(config), inputs), ref) <= 1e-5, config


def test_teacache_path_runs_video_sparse_attention(ckpts, inputs):
    """The TeaCache forward (its own jit) takes the same VSA path: a computed step equals the plain call, and
    it takes a run-time sparsity too."""
    model = _vsa(ckpts[1], 0.5)
    x, t, ctx = inputs
    runtime = model.teacache_params().runtime(0.0, 3)  # threshold 0: every step computes
    cache = model.init_teacache_state(x.shape, jnp.float32, cfg=False, use_ret_steps=runtime.use_ret_steps)
    for sparsity in (None, 0.75):
        extra = {} if sparsity is None else {"vsa_sparsity": sparsity}
        out, _ = model.cached_call(cache, runtime, cfg=False, hidden_states=x, encoder_hidden_states=ctx,
                                   timestep=t, **extra)
        plain = dit_call(model, x, t, ctx, **extra)
        assert float(jnp.abs(out - plain).max()) <= 1e-5 * max(1.0, float(jnp.abs(plain).max()))


def test_cli_flags(tmp_path, monkeypatch, capsys):
    """``--vsa-sparsity`` is checked before any model is looked up; ``--self-attention video_sparse`` reaches the
    transformer (the tiny random Wan has no gates: one line naming to_gate_compress, exit 2)."""
    from fastvideo_jax.entrypoints.cli import main

    monkeypatch.setenv("FASTVIDEO_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTVIDEO_JAX_DEBUG", raising=False)
    base = ["generate", "--model", "tiny-wan", "--prompt", "a robot", "--height", "32", "--width", "32",
            "--num-frames", "5", "--num-inference-steps", "2", "--output", str(tmp_path / "o.mp4"), "--no-progress"]
    assert main([*base[:2], "/nonexistent", *base[3:], "--vsa-sparsity", "1.5"]) == 2
    assert capsys.readouterr().err.startswith("error: vsa_sparsity must be in [0, 1)")
    assert main([*base, "--self-attention", "video_sparse", "--vsa-sparsity", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "to_gate_compress" in err and err.count("\n") == 1


def test_convert_carries_the_gates(tmp_path, inputs):
    """``fastvideo-jax convert`` of a FastWan-layout pipeline loads its DiT in the VSA mode the gates imply: the
    orbax copy loads as a VSA DiT with the same output, and converting it back to Diffusers gives the gates back."""
    from fastvideo_jax.entrypoints.convert_cli import convert
    from fastvideo_jax.testing.tiny_pipeline import write_tiny_wan_pipeline

    root = write_tiny_wan_pipeline(tmp_path / "wan")
    plain = tmp_path / "plain"
    (root / "transformer").rename(plain)
    gates = _with_gates(plain, root / "transformer", 0.5)
    convert(root, tmp_path / "orbax", progress=False)
    convert(tmp_path / "orbax", tmp_path / "back", to="diffusers", progress=False)
    want = dit_call(_vsa(root / "transformer", 0.5), *inputs)
    got = dit_call(_vsa(tmp_path / "orbax" / "transformer", 0.5), *inputs)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    back = SafetensorsCheckpoint.from_dir(tmp_path / "back" / "transformer")
    for key, value in gates.items():
        np.testing.assert_array_equal(np.asarray(back.array(key)), value)
