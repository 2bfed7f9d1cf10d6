"""LoRA at inference on the tiny Wan pipeline: VideoGenerator(lora=, lora_scale=, lora_merge=), set_lora switching
without reloading (exact restore, no recompile for same-rank adapters), the CLI's --lora / --lora-scale, and
LoRAs that do not fit refused before any weight loads."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from fastvideo_jax.entrypoints.cli import main as cli_main
from fastvideo_jax.entrypoints.video_generator import VideoGenerator
from fastvideo_jax.errors import CheckpointError, UserError
from fastvideo_jax.models.layers.lora import adapted_layers, inject_lora
from fastvideo_jax.models.loader.component_loader import TransformerLoader
from fastvideo_jax.models.loader.lora_io import save_lora
from fastvideo_jax.models.loader.safetensors_io import save_safetensors
from fastvideo_jax.testing.tiny_pipeline import write_tiny_wan_pipeline

pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=2, seed=3)
PROMPT = "a robot dancing"


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return write_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny") / "wan")


def _make_lora(tiny_root, path, seed):
    dit = TransformerLoader().load(tiny_root / "transformer", precision="fp32")
    inject_lora(dit, rank=2, alpha=4, rngs=nnx.Rngs(seed))
    for i, linear in enumerate(adapted_layers(dit).values()):
        b = linear.lora.lora_B
        b[...] = jax.random.normal(jax.random.key(seed * 1000 + i), b[...].shape) * 0.5
    return save_lora(dit, path)


@pytest.fixture(scope="module")
def loras(tiny_root, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return _make_lora(tiny_root, d / "a.safetensors", 1), _make_lora(tiny_root, d / "b", 2)


@pytest.fixture(scope="module")
def bad_lora(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "hunyuan.safetensors"
    r = np.zeros((2, 24), np.float32)
    save_safetensors(path, {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": r,
                            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": r.T.copy()})
    return path


def _latents(gen):
    return np.asarray(gen.generate_video(PROMPT, progress=False, **SMALL)["latents"])


def test_generator_lora_kwarg_and_set_lora(tiny_root, loras, bad_lora, count_compiles):
    lora_a, lora_b = loras
    gen = VideoGenerator.from_pretrained(tiny_root, dit_precision="fp32", lora=lora_a, lora_scale=0.8)
    assert gen.pipeline.lora.path == lora_a and gen.pipeline.lora.merged is not None
    merged = _latents(gen)

    gen.set_lora(lora_a, 0.8, merge=False)  # kept separate: the same latents as merged
    separate = _latents(gen)
    rel = np.abs(separate - merged).max() / np.abs(merged).max()
    assert rel <= 1e-5, f"separate vs merged LoRA latents: relative {rel:.3e}"

    gen.set_lora(lora_b, 0.8, merge=False)  # another adapter of the same ranks: the compiled steps serve it
    with count_compiles() as n:
        other = _latents(gen)
    assert n[0] == 0, f"switching to a same-rank adapter compiled {n[0]} executables"
    assert np.abs(other - separate).max() > 1e-3 * np.abs(separate).max()

    with pytest.raises(CheckpointError, match="transformer_blocks.0.attn.to_q"):
        gen.set_lora(bad_lora)
    assert gen.pipeline.lora.path == lora_b  # the refused file changed nothing
    np.testing.assert_array_equal(_latents(gen), other)

    gen.set_lora(lora_a, 0.8, merge=True)
    gen.set_lora_scale(0.0)  # merged at scale 0 = the plain model
    zero = _latents(gen)
    gen.set_lora(None)
    assert not adapted_layers(gen.pipeline.transformer)
    plain = _latents(gen)
    np.testing.assert_allclose(zero, plain, rtol=0, atol=1e-6 * np.abs(plain).max())
    assert np.abs(plain - merged).max() > 1e-3 * np.abs(plain).max()  # the LoRA did change the video

    base = VideoGenerator.from_pretrained(tiny_root, dit_precision="fp32")
    np.testing.assert_array_equal(_latents(base), plain)  # unmerged + removed: exactly the unloaded model
    with pytest.raises(UserError, match="lora_scale must be finite"):
        base.set_lora(lora_a, float("nan"))
    with pytest.raises(UserError, match=r"one of \['transformer'\]; got 'transformer_2'"):
        base.set_lora(lora_a, component="transformer_2")  # a one-expert model
    with pytest.raises(UserError, match="got 'vae'"):
        base.set_lora(lora_a, component="vae")
    assert base.pipeline.loras == {}


@pytest.fixture
def no_weights(monkeypatch):
    from fastvideo_jax.models.loader import component_loader

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(component_loader, "load_component", refuse)


def _cli(capsys, *argv):
    code = cli_main(["generate", "--prompt", PROMPT, "--no-progress", *argv])
    return code, capsys.readouterr()


def test_cli_lora_flags(tiny_root, loras, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    code, io = _cli(capsys, "--model", str(tiny_root), "--lora", str(loras[0]), "--lora-scale", "0.5",
                    "--output", str(out), "--height", "32", "--width", "48", "--num-frames", "5",
                    "--num-inference-steps", "2")
    assert code == 0, io.err
    assert out.is_file() and "wrote" in io.out


def test_cli_refuses_a_lora_for_another_model_before_loading(tiny_root, bad_lora, tmp_path, capsys, no_weights):
    code, io = _cli(capsys, "--model", str(tiny_root), "--lora", str(bad_lora), "--output", str(tmp_path / "v.mp4"))
    assert code == 2 and "match no layer of WanTransformer3DModel" in io.err, io.err
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in io.err
    code, io = _cli(capsys, "--model", str(tiny_root), "--lora", str(tmp_path / "missing.safetensors"),
                    "--output", str(tmp_path / "v.mp4"))
    assert code == 2 and "no such LoRA file" in io.err, io.err
    code, io = _cli(capsys, "--model", str(tiny_root), "--lora-scale", "0.5", "--output", str(tmp_path / "v.mp4"))
    assert code == 2 and "--lora-scale needs --lora" in io.err, io.err


def test_each_expert_has_its_own_lora(tiny_root, loras):
    """Wan2.2 A14B layout (two experts, the tiny DiT twice, boundary 0.9 so the 2nd step is the low-noise
    expert's): a LoRA on transformer_2 changes the video, one on transformer changes it otherwise, and dropping
    both gives the plain latents bit for bit."""
    from fastvideo_jax.models.loader.component_loader import TransformerLoader

    plain = VideoGenerator.from_pretrained(tiny_root, dit_precision="fp32", mesh="data=1")
    p = plain.pipeline
    parts = dict(p.components, transformer_2=TransformerLoader().load(tiny_root / "transformer", precision="fp32"))
    gen = VideoGenerator(type(p)(parts, p.config.replace(boundary_ratio=0.9)), plain.defaults, plain.model_path)
    base = _latents(gen)
    gen.set_lora(loras[0], component="transformer_2")
    low = _latents(gen)
    assert np.abs(low - base).max() > 1e-3 * np.abs(base).max()
    gen.set_lora(None, component="transformer_2")
    gen.set_lora(loras[0], component="transformer")
    high = _latents(gen)
    assert np.abs(high - base).max() > 1e-3 * np.abs(base).max() and np.abs(high - low).max() > 0
    gen.set_lora(loras[1], component="transformer_2")
    assert set(gen.pipeline.loras) == {"transformer", "transformer_2"}
    gen.set_lora(None)
    gen.set_lora(None, component="transformer_2")
    assert gen.pipeline.loras == {}
    np.testing.assert_array_equal(_latents(gen), base)
