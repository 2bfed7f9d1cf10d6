"""Conversion CLI (orbax and back), nothing-lost guarantees, and sharded loading on 8 fake CPU devices."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fastvideo_jax.entrypoints.convert_cli as conv_cli
from fastvideo_jax.entrypoints.cli import main as cli_main
from fastvideo_jax.models.loader.component_loader import TransformerLoader, export_component
from fastvideo_jax.utils.nnx_vars import host_params
from fastvideo_jax.models.loader.safetensors_io import CheckpointError, SafetensorsCheckpoint
from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh
from fastvideo_jax.testing.tiny_pipeline import write_tiny_wan_pipeline
from tests.oracles import dit_call, errors

MODEL_COMPONENTS = ("transformer", "text_encoder", "vae")

GOLDEN = Path(__file__).parent / "golden" / "partition_specs.json"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A complete Diffusers-layout Wan pipeline (DiT, UMT5, VAE, tokenizer, scheduler), random fp32 weights."""
    return write_tiny_wan_pipeline(tmp_path_factory.mktemp("pipe") / "tiny")


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _params(model) -> dict:
    return host_params(nnx.state(model, nnx.Param))


def test_safetensors_orbax_safetensors_round_trip(pipeline, tmp_path):
    before = _digest(pipeline)
    orbax_dir = conv_cli.convert(pipeline, tmp_path / "orbax", dtype="fp32", progress=False)
    back = conv_cli.convert(orbax_dir, tmp_path / "back", to="diffusers", progress=False)
    assert _digest(pipeline) == before, "SRC was modified"
    for name in MODEL_COMPONENTS:
        src = SafetensorsCheckpoint.from_dir(pipeline / name)
        out = SafetensorsCheckpoint.from_dir(back / name)
        assert sorted(src) == sorted(out), name
        for key in src:
            a, b = src.array(key), out.array(key)
            assert a.dtype == b.dtype and np.array_equal(a, b), f"{name}: {key}"
    for name in ("scheduler", "tokenizer"):
        for f in (pipeline / name).iterdir():
            assert (back / name / f.name).read_bytes() == f.read_bytes(), f"{name}/{f.name}"
    assert json.loads((orbax_dir / "model_index.json").read_text())["_fastvideo_jax"]["format"] == "orbax"


@pytest.mark.parametrize("name", MODEL_COMPONENTS)
def test_orbax_and_safetensors_load_identical_params(pipeline, tmp_path_factory, name):
    from fastvideo_jax.models.loader.pipeline_loader import MODEL_LOADERS

    orbax_dir = tmp_path_factory.getbasetemp() / "orbax-bf16"
    if not orbax_dir.exists():
        conv_cli.convert(pipeline, orbax_dir, dtype="bf16", progress=False)
    loader = MODEL_LOADERS[name]()
    from_st = _params(loader.load(pipeline / name, precision="bf16"))
    model = loader.load(orbax_dir / name)
    assert model.config.precision == "bf16"
    from_orbax = _params(model)
    assert from_st.keys() == from_orbax.keys()
    for path in from_st:
        assert from_st[path].dtype == from_orbax[path].dtype, path
        assert np.array_equal(from_st[path], from_orbax[path]), path


def test_converted_pipeline_generates_identical_video(pipeline, tmp_path):
    from fastvideo_jax.entrypoints.video_generator import VideoGenerator

    orbax_dir = conv_cli.convert(pipeline, tmp_path / "orbax", dtype="fp32", progress=False)
    request = dict(height=32, width=32, num_frames=5, num_inference_steps=2, seed=3, progress=False)
    a = VideoGenerator.from_pretrained(pipeline, dit_precision="fp32", vae_decode_precision="fp32", text_len=16)
    b = VideoGenerator.from_pretrained(orbax_dir, dit_precision="fp32", vae_decode_precision="fp32", text_len=16)
    assert np.array_equal(a.generate_video("a red car", **request)["frames"],
                          b.generate_video("a red car", **request)["frames"])


def test_dst_exists_refused_then_overwrite(pipeline, tmp_path, capsys):
    dst = tmp_path / "out"
    conv_cli.convert(pipeline, dst, progress=False)
    (dst / "keep.txt").write_text("precious")
    assert cli_main(["convert", str(pipeline), str(dst), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "precious"
    assert cli_main(["convert", str(pipeline), str(dst), "--overwrite", "--no-progress"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "transformer" / "params").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "temporary folders or lock file left behind"


def test_failure_midway_leaves_no_dst(pipeline, tmp_path, monkeypatch):
    calls = []
    real = conv_cli._write_model

    def flaky(name, *a, **k):
        calls.append(name)
        real(name, *a, **k)
        raise RuntimeError("simulated crash after writing a component")

    monkeypatch.setattr(conv_cli, "_write_model", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        conv_cli.convert(pipeline, tmp_path / "dst", progress=False)
    assert len(calls) == 1 and calls[0] in MODEL_COMPONENTS
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "partial output left behind"


def test_corrupt_src_names_the_file(pipeline, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(pipeline, src)
    weights = src / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        conv_cli.convert(src, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_missing_model_index(tmp_path):
    with pytest.raises(CheckpointError, match="no model_index.json"):
        conv_cli.convert(tmp_path, tmp_path.parent / "dst-none", progress=False)


MESHES = {"fsdp8": MeshConfig(fsdp=8), "fsdp4_tensor2": MeshConfig(fsdp=4, tensor=2)}


def _specs(model) -> dict[str, str]:
    return {".".join(map(str, p)): str(v[...].sharding.spec) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _check_golden(component: str, mesh_name: str, specs: dict[str, str]) -> None:
    golden = json.loads(GOLDEN.read_text())[component][mesh_name]
    assert specs == golden, f"{component} PartitionSpecs on {mesh_name} differ from {GOLDEN.name}"
    assert any("fsdp" in s for s in specs.values())


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_dit_matches_single_device(pipeline, mesh_name):
    assert jax.device_count() == 8
    mesh = make_mesh(MESHES[mesh_name])
    single = TransformerLoader().load(pipeline / "transformer", precision="fp32")
    sharded = TransformerLoader().load(pipeline / "transformer", precision="fp32", mesh=mesh)
    _check_golden("transformer", mesh_name, _specs(sharded))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 16, 3, 6, 10)), jnp.float32)
    t = jnp.asarray([999.0, 3.0])
    ctx = jnp.asarray(rng.standard_normal((2, 7, 32)), jnp.float32)
    err, rel = errors(dit_call(sharded, x, t, ctx), dit_call(single, x, t, ctx))
    assert err < 1e-5, f"{mesh_name}: max-abs {err:.3e}, relative {rel:.3e}"


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_umt5_matches_single_device(pipeline, mesh_name):
    from fastvideo_jax.models.loader.component_loader import TextEncoderLoader

    mesh = make_mesh(MESHES[mesh_name])
    single = TextEncoderLoader().load(pipeline / "text_encoder", precision="fp32")
    sharded = TextEncoderLoader().load(pipeline / "text_encoder", precision="fp32", mesh=mesh)
    _check_golden("text_encoder", mesh_name, _specs(sharded))
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 60, size=(3, 19)), jnp.int32)
    mask = jnp.asarray(np.arange(19)[None, :] < np.array([[19], [11], [4]]), jnp.int32)
    err, rel = errors(sharded(ids, mask).last_hidden_state, single(ids, mask).last_hidden_state)
    assert err < 1e-5, f"{mesh_name}: max-abs {err:.3e}, relative {rel:.3e}"


def test_orbax_restores_into_target_shardings(pipeline, tmp_path):
    orbax_dir = conv_cli.convert(pipeline, tmp_path / "orbax", dtype="fp32", progress=False)
    mesh = make_mesh(MESHES["fsdp4_tensor2"])
    restored = TransformerLoader().load(orbax_dir / "transformer", mesh=mesh)
    direct = TransformerLoader().load(pipeline / "transformer", precision="fp32", mesh=mesh)
    assert _specs(restored) == _specs(direct)
    exported, original = export_component(restored), SafetensorsCheckpoint.from_dir(pipeline / "transformer")
    assert all(np.array_equal(exported[k], original.array(k)) for k in original)
