"""``generate`` hardening: bad paths, numbers, types and components fail early with one clear line; writes are
all or nothing; defaults come from the checkpoint's contents; VAE tiling reaches the VAE."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from fastvideo_jax.entrypoints import model_spec, video_generator
from fastvideo_jax.entrypoints.cli import main as cli_main
from fastvideo_jax.entrypoints.model_spec import ModelSpec
from fastvideo_jax.entrypoints.video_generator import VideoGenerator
from fastvideo_jax.errors import CheckpointError, NonFiniteError, OutputPathError, UserError
from fastvideo_jax.testing.tiny_pipeline import write_tiny_wan_pipeline
from fastvideo_jax.utils import video
from fastvideo_jax.utils.video import read_mp4

pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=2)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return write_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny") / "some-folder")


@pytest.fixture(scope="module")
def gen(tiny_root):
    return VideoGenerator.from_pretrained(tiny_root)


@pytest.fixture
def no_weights(monkeypatch):
    """Reading any weight is a test failure: errors must come before loading."""
    from fastvideo_jax.models.loader import component_loader

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(component_loader, "load_component", refuse)


def _copy(root, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(root, target)
    return target


def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli_main(["generate", "--prompt", "a robot dancing", "--no-progress", *argv])
    return code, capsys.readouterr().err


@contextlib.contextmanager
def _tmpfs(path, options):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


# ---- R3: output paths checked first; writes that fail leave nothing and say why ---------------------------
@pytest.mark.parametrize("name,cause", [
    ("a_dir", "is a directory"),
    ("dir.mp4", "is a directory"),
    ("video", "must be an .mp4 file \\(got no extension\\)"),
    ("video.avi", "got extension '.avi'"),
    ("a_file/video.mp4", "a_file is not a directory"),
    ("a_file/deeper/video.mp4", "a_file is not a directory"),
])
def test_bad_output_path_fails_before_anything(tmp_path, capsys, name, cause):
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "dir.mp4").mkdir()
    (tmp_path / "a_file").write_text("keep me")
    missing_model = tmp_path / "no-model-here"
    code, err = _cli(capsys, "--model", str(missing_model), "--output", str(tmp_path / name))
    assert code == 2 and err.startswith(f"error: {tmp_path / name}: ") and err.count("\n") == 1, err
    assert re.search(cause, err), err
    assert (tmp_path / "a_file").read_text() == "keep me" and not missing_model.exists()


def test_python_api_checks_output_path_before_generating(gen, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("generated before checking the output path")

    monkeypatch.setattr(type(gen.pipeline), "__call__", never)
    (tmp_path / "a_file").write_text("x")
    for bad in ("v.avi", "a_file/v.mp4", "."):
        with pytest.raises(OutputPathError):
            gen.generate_video("a cat", output_path=tmp_path / bad, progress=False, **SMALL)
    with pytest.raises(OutputPathError, match="v_1.mp4: is a directory"):  # every one of several videos
        (tmp_path / "v_1.mp4").mkdir()
        gen.generate_video("a cat", output_path=tmp_path / "v.mp4", num_videos_per_prompt=2, progress=False, **SMALL)


def test_missing_parent_folders_are_created_only_on_write(tmp_path):
    target = tmp_path / "new" / "deeper" / "v.mp4"
    assert video.check_output_path(target) == target and not (tmp_path / "new").exists()
    video.write_mp4(target, np.zeros((5, 16, 16, 3), np.uint8), fps=4)
    assert read_mp4(target).shape == (5, 16, 16, 3)


def test_read_only_directory_stubbed(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(video.tempfile, "mkstemp", read_only)
    with pytest.raises(OutputPathError, match=f"{tmp_path / 'v.mp4'}: cannot write in {tmp_path} \\(Read-only"):
        video.check_output_path(tmp_path / "v.mp4")


def test_read_only_mount_fails_before_loading(tmp_path, capsys):
    with _tmpfs(tmp_path / "ro", "size=64k,ro") as ro:
        code, err = _cli(capsys, "--model", str(tmp_path / "no-model"), "--output", str(ro / "v.mp4"))
        assert code == 2 and err == f"error: {ro / 'v.mp4'}: cannot write in {ro} (Read-only file system)\n", err
        assert os.listdir(ro) == []


def test_full_disk_stubbed_leaves_nothing_and_keeps_old_file(gen, tmp_path, monkeypatch):
    old = tmp_path / "v_1.mp4"
    old.write_bytes(b"an earlier video")

    def full(path, frames, fps):
        path.write_bytes(b"\0" * 100)  # a writer that got part way
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(video, "_write", full)
    with pytest.raises(OutputPathError, match=r"v_0.mp4: writing the video failed \(no space left on device in"):
        gen.generate_video("a cat", output_path=tmp_path / "v.mp4", num_videos_per_prompt=2, progress=False, **SMALL)
    assert sorted(os.listdir(tmp_path)) == ["v_1.mp4"] and old.read_bytes() == b"an earlier video"


def test_writer_that_reports_success_but_writes_garbage(tmp_path, monkeypatch):
    monkeypatch.setattr(video, "_write", lambda path, frames, fps: path.write_bytes(b"\0" * 16384))
    with pytest.raises(OutputPathError, match=r"v.mp4: writing the video failed"):
        video.write_mp4(tmp_path / "v.mp4", np.zeros((5, 16, 16, 3), np.uint8))
    assert os.listdir(tmp_path) == []


def test_short_video_read_back_is_an_error(tmp_path, monkeypatch):
    real = video._write
    monkeypatch.setattr(video, "_write", lambda path, frames, fps: real(path, frames[:3], fps))
    with pytest.raises(OutputPathError, match=r"v.mp4: the written video reads back 3 of 5 frames"):
        video.write_mp4(tmp_path / "v.mp4", np.zeros((5, 16, 16, 3), np.uint8))
    assert os.listdir(tmp_path) == []


def test_cli_on_a_full_disk_exits_2_and_leaves_nothing(tiny_root, tmp_path, capsys):
    with _tmpfs(tmp_path / "full", "size=16k") as full:
        code, err = _cli(capsys, "--model", str(tiny_root), "--output", str(full / "v.mp4"), "--seed", "3",
                         *[f"--{k.replace('_', '-')}={v}" for k, v in dict(SMALL, height=64, width=64).items()])
        assert code == 2 and err.startswith(f"error: {full / 'v.mp4'}: ") and err.endswith(
            f"(no space left on device in {full})\n"), err
        assert os.listdir(full) == []


# ---- R4: bad numbers and bad latents ------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--guidance-scale", "inf"], "guidance_scale must be finite, got inf"),
    (["--guidance-scale", "nan"], "guidance_scale must be finite, got nan"),
    (["--guidance-scale", "-1"], "guidance_scale must be >= 0.0, got -1.0"),
    (["--flow-shift", "0"], "flow_shift must be > 0.0, got 0.0"),
    (["--flow-shift", "-2"], "flow_shift must be > 0.0, got -2.0"),
    (["--flow-shift", "nan"], "flow_shift must be finite, got nan"),
    (["--flow-shift", "inf"], "flow_shift must be finite, got inf"),
    (["--num-inference-steps", "1001"], "num_inference_steps must be at least 1 and at most 1000, got 1001"),
])
def test_bad_numbers_fail_before_loading(tmp_path, capsys, flags, message):
    code, err = _cli(capsys, "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "v.mp4"), *flags)
    assert code == 2 and err == f"error: {message}\n", err


def test_nonfinite_latents_are_an_error_not_a_black_video(gen):
    shape = gen.pipeline.latent_shape(1, 5, 32, 48)
    latents = jnp.zeros(shape).at[0, 0, 0, 0, 0].set(jnp.nan)
    with pytest.raises(NonFiniteError, match="denoised latents contain NaN or Inf"):
        gen.pipeline.decode(latents)


# ---- R5: errors early, naming the thing ----------------------------------------------------------------------
def test_size_beyond_rope_table_fails_before_loading(tiny_root, tmp_path, capsys, no_weights):
    code, err = _cli(capsys, "--model", str(tiny_root), "--output", str(tmp_path / "v.mp4"), "--height", "1024")
    assert code == 2 and "RoPE table covers 32 tokens per axis, the request needs height 64" in err, err


def test_size_beyond_rope_table_python_api(gen):
    with pytest.raises(UserError, match="too large for this model"):
        gen.generate_video("a cat", width=1024, progress=False)


def test_broken_tokenizer_file_fails_before_weights(tiny_root, tmp_path, no_weights):
    root = _copy(tiny_root, tmp_path)
    (root / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(CheckpointError, match=r"tokenizer/tokenizer.json: not valid JSON"):
        VideoGenerator.from_pretrained(root)


def test_unreadable_tokenizer_names_its_folder(tiny_root, tmp_path, no_weights):
    root = _copy(tiny_root, tmp_path)
    (root / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    with pytest.raises(CheckpointError, match=r"tokenizer: the tokenizer could not be loaded from .*tokenizer.json"):
        VideoGenerator.from_pretrained(root)


def test_unknown_scheduler_class_fails_before_weights(tiny_root, tmp_path, no_weights):
    root = _copy(tiny_root, tmp_path)
    config = root / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "DPMSolverWhatever"}))
    with pytest.raises(UserError, match="DPMSolverWhatever.* is not registered"):
        VideoGenerator.from_pretrained(root)


@pytest.mark.parametrize("component", ["vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component_folder_fails_before_weights(tiny_root, tmp_path, no_weights, component):
    root = _copy(tiny_root, tmp_path)
    shutil.rmtree(root / component)
    with pytest.raises(CheckpointError, match=f"{root / component}: component folder missing"):
        VideoGenerator.from_pretrained(root)


@pytest.mark.parametrize("field,value,message", [
    ("height", 64.0, "height must be an integer, got float 64.0"),
    ("num_frames", "9", "num_frames must be an integer, got str '9'"),
    ("seed", 1.5, "seed must be an integer, got float 1.5"),
    ("num_inference_steps", True, "num_inference_steps must be an integer, got bool True"),
    ("guidance_scale", "5", "guidance_scale must be a number, got str '5'"),
    ("negative_prompt", ["x"], "negative_prompt must be a string"),
])
def test_python_api_names_the_field_for_wrong_types(gen, field, value, message):
    with pytest.raises(UserError, match=message):
        gen.generate_video("a cat", progress=False, **{field: value})


def test_python_api_list_prompt(gen):
    with pytest.raises(UserError, match=r"prompt must be a non-empty string, got list \['a', 'b'\]"):
        gen.generate_video(["a", "b"], progress=False)


def test_pipeline_config_overrides_are_checked(tiny_root):
    with pytest.raises(UserError, match="dit_precision must be one of"):
        VideoGenerator.from_pretrained(tiny_root, dit_precision="fp8")
    with pytest.raises(UserError, match="flow_shift must be finite"):
        VideoGenerator.from_pretrained(tiny_root, flow_shift=math.inf)
    with pytest.raises(TypeError, match="vae_precision"):  # unused, so removed
        VideoGenerator.from_pretrained(tiny_root, vae_precision="fp32")


# ---- R6 ---------------------------------------------------------------------------------------------------------
def test_defaults_come_from_contents_not_folder_name(tiny_root, tmp_path):
    misleading = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    shutil.copytree(tiny_root, misleading)
    for root in (tiny_root, misleading):
        spec = ModelSpec.open(root)
        assert (spec.defaults.height, spec.defaults.width, spec.defaults.num_frames) == (64, 64, 9)
        assert spec.config.dit_precision == "fp32" and spec.config.text_len == 32


def test_long_prompt_warns_with_token_counts(gen, caplog):
    from fastvideo_jax.models.encoders.text import tokenize_prompts

    prompts = ["a cat playing piano in a sunny room", "a cat"]
    n = [len(ids) for ids in gen.pipeline.tokenizer(prompts)["input_ids"]]
    assert n[0] > 6 >= n[1]
    with caplog.at_level(logging.WARNING, logger="fastvideo_jax.models.encoders.text"):
        ids, _ = tokenize_prompts(gen.pipeline.tokenizer, prompts, 6)
    assert ids.shape == (2, 6)
    assert [r.getMessage() for r in caplog.records] == [
        f"prompt 0 has {n[0]} tokens; only the first 6 are used (text_len=6), {n[0] - 6} are dropped"]


def test_several_videos_are_all_written(gen, tmp_path):
    out = gen.generate_video("a cat", output_path=tmp_path / "v.mp4", num_videos_per_prompt=2, seed=5,
                             progress=False, **SMALL)
    assert out["paths"] == [tmp_path / "v_0.mp4", tmp_path / "v_1.mp4"] and out["path"] == out["paths"][0]
    written = [read_mp4(path).astype(int) for path in out["paths"]]
    assert all(w.shape == (5, 32, 48, 3) for w in written)
    for i in range(2):  # lossy H.264 of noise: each file is nearer its own video than the other one
        assert np.abs(written[i] - out["frames"][i]).mean() < np.abs(written[i] - out["frames"][1 - i]).mean()
    assert sorted(os.listdir(tmp_path)) == ["v_0.mp4", "v_1.mp4"]


def test_compilation_cache_variable_naming_a_file(tmp_path, monkeypatch):
    from fastvideo_jax.utils.compile_cache import enable_persistent_cache

    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("FASTVIDEO_JAX_COMPILATION_CACHE", str(tmp_path / "f"))
    with pytest.raises(UserError, match=f"FASTVIDEO_JAX_COMPILATION_CACHE={tmp_path / 'f'}: .* is not a directory"):
        enable_persistent_cache(tmp_path / "xla")


# ---- item 6, 7, 11 -------------------------------------------------------------------------------------------------
def test_production_modules_do_not_import_testing():
    code = ("import sys; import fastvideo_jax.entrypoints.cli, fastvideo_jax.entrypoints.video_generator, "
            "fastvideo_jax.models.loader.pipeline_loader; "
            "assert not [m for m in sys.modules if m.startswith('fastvideo_jax.testing')], 'testing imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_vae_tiling_flag_reaches_the_spec(tiny_root, tmp_path, capsys, monkeypatch):
    seen = []

    def stop(spec, **kwargs):
        seen.append(spec.config.vae_tiling)
        raise UserError("stop")

    monkeypatch.setattr(video_generator.VideoGenerator, "from_spec", staticmethod(stop))
    for flags in ([], ["--vae-tiling"]):
        _cli(capsys, "--model", str(tiny_root), "--output", str(tmp_path / "v.mp4"), *flags)
    assert seen == [False, True]


def test_vae_tiling_reaches_the_decode(gen):
    """With small tiles, the tiled decode differs from the untiled one except in the top-left tile's kept
    region, which is that tile's own untiled decode (as tests/test_wan_vae.py establishes)."""
    from fastvideo_jax.models.loader.component_loader import VAELoader
    from fastvideo_jax.pipelines.wan import WanPipeline

    vae = VAELoader().load(gen.model_path / "vae", precision="fp32", tile_sample_min_height=32,
                           tile_sample_min_width=32, tile_sample_stride_height=16, tile_sample_stride_width=16)
    p = gen.pipeline
    z = np.random.default_rng(0).standard_normal(p.latent_shape(1, 5, 64, 64)).astype(np.float32)
    frames = {}
    for tiling in (False, True):
        config = dataclasses.replace(p.config, vae_tiling=tiling)
        frames[tiling] = WanPipeline({**p.components, "vae": vae}, config).decode(z)
    assert not np.array_equal(frames[True], frames[False])
    top_left = np.asarray(vae.decode(vae.denormalize_latents(jnp.asarray(z))[..., :4, :4], tiled=False))
    expected = np.asarray(video_frames(top_left))[:, :, :16, :16]
    assert np.array_equal(frames[True][:, :, :16, :16], expected)


def video_frames(video_b3fhw):
    from fastvideo_jax.pipelines.stages.decoding import _to_uint8

    return _to_uint8(jnp.asarray(video_b3fhw))


def test_cli_silences_transformers_torch_notice():
    """transformers logs "PyTorch was not found" on import without torch; the CLI drops that one message."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from fastvideo_jax.entrypoints.cli import main\n"
            "try:\n    main(['generate', '--help'])\nexcept SystemExit:\n    pass\n"
            "import transformers, logging\n"
            "logging.getLogger('transformers').warning('another transformers warning')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert "PyTorch" not in r.stderr and "another transformers warning" in r.stderr, r.stderr


def test_written_video_gets_ordinary_permissions(tmp_path):
    """Written under a mkstemp name (0600) and renamed: the video must read as a plainly created file (0644
    under umask 022), not a private one."""
    from fastvideo_jax.utils.video import write_videos

    old = os.umask(0o022)
    try:
        paths = write_videos([tmp_path / "v.mp4"], [np.zeros((5, 32, 48, 3), np.uint8)], fps=8)
    finally:
        os.umask(old)
    assert [p.stat().st_mode & 0o777 for p in paths] == [0o644]
