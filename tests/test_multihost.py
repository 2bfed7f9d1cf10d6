"""Multi-host on JAX's own engine: 2 processes on localhost (4 CPU devices each, gloo collectives) load the tiny
pipeline on one global 8-device mesh, denoise with CFG and decode; only process 0 writes the video.

Against one process with 8 devices on the same mesh the results agree to fp32 rounding, not bit for bit:
XLA:CPU's numerics depend on how many devices a process has, even without any mesh (measured: the tiny VAE's
plain one-device decode differs by 6.5e-6 between a process with 4 fake devices and one with 8). So the
denoised latents (fp32) must match to 1e-5 relative and the frames to one uint8 level in at most 0.1% of the
values (a value next to a rounding boundary may flip).
Also: the environment switches and their errors.

The test runs this file as the worker (``python tests/test_multihost.py worker ...``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastvideo_jax.errors import UserError
from fastvideo_jax.parallel import distributed

REPO = Path(__file__).resolve().parents[1]
MESH = "data=2,fsdp=2,sequence=2"  # CFG on data, Ulysses on sequence (tiny-wan has 2 heads), weights over all
REQUEST = dict(height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=5.0, seed=7)
PROMPT = "a red kite over the sea"


def generate(model_dir: str, output: Path | None) -> dict:
    """What each process runs: VideoGenerator joins the run (from the environment) before it builds the global
    mesh, then loads and generates."""
    from fastvideo_jax.entrypoints.video_generator import VideoGenerator

    generator = VideoGenerator.from_pretrained(model_dir, mesh=MESH, dit_precision="fp32", vae_decode_precision="fp32")
    out = generator.generate_video(PROMPT, output_path=output, progress=False, **REQUEST)
    return {**out, "mesh": dict(generator.pipeline.mesh.shape)}


def _worker(model_dir: str, out_dir: str) -> None:
    import jax

    out = generate(model_dir, Path(out_dir) / f"video_p{os.environ[distributed.ENV_PROCESS_ID]}.mp4")
    pid = jax.process_index()
    np.save(Path(out_dir) / f"frames_p{pid}.npy", out["frames"])
    np.save(Path(out_dir) / f"latents_p{pid}.npy", np.asarray(out["latents"]))
    (Path(out_dir) / f"info_p{pid}.json").write_text(json.dumps(
        {"processes": jax.process_count(), "devices": jax.device_count(), "local": len(jax.local_devices()),
         "mesh": out["mesh"], "collectives": jax.config.jax_cpu_collectives_implementation}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from fastvideo_jax.testing.tiny_pipeline import write_tiny_wan_pipeline

    return write_tiny_wan_pipeline(tmp_path_factory.mktemp("mh") / "tiny")


def test_two_processes_one_mesh_equal_one_process(tiny_dir, tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTVIDEO_JAX_")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}", FASTVIDEO_JAX_COMPILATION_CACHE="0",
               FASTVIDEO_JAX_COORDINATOR=f"localhost:{port}", FASTVIDEO_JAX_NUM_PROCESSES="2")
    procs = [
        subprocess.Popen([sys.executable, __file__, "worker", str(tiny_dir), str(tmp_path)], cwd=tmp_path,
                         env={**env, "FASTVIDEO_JAX_PROCESS_ID": str(pid)}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for pid in range(2)
    ]
    try:
        ref = generate(str(tiny_dir), None)  # this process: 8 devices, the same mesh
        reference, latents = ref["frames"], np.asarray(ref["latents"])
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for pid, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {pid} failed:\n{log[-4000:]}"
    for pid in range(2):
        info = json.loads((tmp_path / f"info_p{pid}.json").read_text())
        assert info["processes"] == 2 and info["devices"] == 8 and info["local"] == 4, info
        assert info["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1, "sequence": 2}, info
        got = np.load(tmp_path / f"latents_p{pid}.npy")
        rel = np.linalg.norm(got - latents) / np.linalg.norm(latents)
        assert rel <= 1e-5, f"process {pid}: latents differ from one process by {rel:.2e} (relative)"
        frames = np.load(tmp_path / f"frames_p{pid}.npy")
        assert frames.shape == reference.shape and frames.dtype == np.uint8
        diff = np.abs(frames.astype(np.int16) - reference)
        assert diff.max() <= 1 and np.mean(diff > 0) <= 1e-3, (
            f"process {pid}: frames differ beyond rounding flips ({int((diff > 0).sum())} values, max {diff.max()})")
    assert (tmp_path / "video_p0.mp4").stat().st_size > 0
    assert not (tmp_path / "video_p1.mp4").exists(), "process 1 wrote a file"


def test_env_without_settings_is_single_process():
    assert distributed.initialize_from_env({}) is False


@pytest.mark.parametrize("env, match", [
    ({"FASTVIDEO_JAX_COORDINATOR": "localhost:1234"}, "FASTVIDEO_JAX_NUM_PROCESSES, FASTVIDEO_JAX_PROCESS_ID"),
    ({"FASTVIDEO_JAX_COORDINATOR": "localhost", "FASTVIDEO_JAX_NUM_PROCESSES": "2", "FASTVIDEO_JAX_PROCESS_ID": "0"},
     "host:port"),
    ({"FASTVIDEO_JAX_COORDINATOR": "h:1", "FASTVIDEO_JAX_NUM_PROCESSES": "2", "FASTVIDEO_JAX_PROCESS_ID": "2"},
     r"process id 2 is not in \[0, 2\)"),
    ({"FASTVIDEO_JAX_NUM_PROCESSES": "two"}, "is not an integer"),
    ({"FASTVIDEO_JAX_DISTRIBUTED": "yes"}, "only value is 'auto'"),
])
def test_bad_env_is_a_user_error_before_any_connection(env, match):
    with pytest.raises(UserError, match=match):
        distributed.initialize_from_env(env)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(*sys.argv[2:4])
