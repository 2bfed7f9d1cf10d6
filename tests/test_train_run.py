"""`fastvideo-jax train`: SIGKILL and restart gives the uninterrupted run's losses (bitwise), clear errors for an
empty dataset and for a resume directory written by another model (before any weight is read)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fastvideo_jax.entrypoints.cli import main
from fastvideo_jax.testing.tiny_pipeline import write_tiny_wan_pipeline
from fastvideo_jax.testing.toy_dataset import write_toy_dataset

ROOT = Path(__file__).resolve().parents[1]

# The test's own wrapper around the CLI: after step HOLD it stops (sleeps) until the test kills it.
WRAPPER = textwrap.dedent("""
    import sys, time
    from fastvideo_jax.entrypoints.cli import build_parser
    from fastvideo_jax.entrypoints.train_cli import run_train
    hold = int(sys.argv[1])
    def on_step(step, metrics):
        if step == hold:
            print("HOLD", flush=True)
            time.sleep(600)
    sys.exit(run_train(build_parser().parse_args(sys.argv[2:]), on_step=on_step))
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_tiny_wan_pipeline(root / "model")
    write_toy_dataset(root / "data", count=4)
    return root


def _args(root: Path, out: Path, steps: int = 5) -> list[str]:
    return ["train", "--model", str(root / "model"), "--data", str(root / "data"), "--output-dir", str(out),
            "--max-steps", str(steps), "--batch-size", "2", "--checkpoint-every", "2", "--log-every", "1",
            "--precision", "fp32", "--mesh", "data=1", "--no-export", "--no-progress", "--learning-rate", "1e-3"]


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"metrics steps not one per step: {steps}"
    return {r["step"]: r["loss"] for r in records}


def _committed(out: Path, step: int) -> bool:
    return (out / "checkpoints" / str(step) / "state" / "_METADATA").exists() or (
        out / "checkpoints" / str(step) / "commit_success.txt").exists()


def test_sigkill_and_restart_gives_the_same_losses(setup, tmp_path):
    """Losses of the restarted run equal the uninterrupted run's bit for bit (same compiled step, the state
    restored exactly, noise/timesteps a function of the step, batches a function of (seed, step))."""
    reference = tmp_path / "reference"
    assert main(_args(setup, reference)) == 0
    expected = _losses(reference)
    assert sorted(expected) == [1, 2, 3, 4, 5]

    out = tmp_path / "killed"
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, str(wrapper), "3", *_args(setup, out)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "HOLD", "the run ended before step 3"
        deadline = time.time() + 60
        while not _committed(out, 2) and time.time() < deadline:
            time.sleep(0.2)
        assert _committed(out, 2), "no committed checkpoint at step 2"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(_losses(out)) == [1, 2, 3]  # step 3 was logged, not checkpointed

    done = subprocess.run([sys.executable, str(wrapper), "-1", *_args(setup, out)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _losses(out) == expected  # bitwise: every step, 3 recomputed after the restore
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 5]


def test_empty_dataset_is_refused(setup, tmp_path, capsys):
    empty = write_toy_dataset(tmp_path / "empty", count=0)
    out = tmp_path / "out"
    args = _args(setup, out)
    args[args.index("--data") + 1] = str(empty)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "empty" in err and str(empty) in err and len(err.splitlines()) == 1
    assert not out.exists()  # nothing written


def test_resume_from_another_models_checkpoint_is_refused(setup, tmp_path, capsys):
    """A checkpoint whose architecture differs (num_layers) is refused, naming the field, before any weight is
    read (the other model's weights are deliberately unreadable: its config says 1 layer, its file has 2)."""
    from fastvideo_jax.configs.models.dits.wanvideo import WanVideoConfig
    from fastvideo_jax.models.loader.component_loader import read_config
    from fastvideo_jax.training.checkpoint import TrainCheckpointer, model_fingerprint

    out = tmp_path / "out"
    other = tmp_path / "other"
    shutil.copytree(setup / "model", other)
    raw = read_config(other / "transformer")
    (other / "transformer" / "config.json").write_text(json.dumps({**raw, "num_layers": 1}))
    config = WanVideoConfig().update_model_arch(read_config(setup / "model" / "transformer"))
    ckpt = TrainCheckpointer(out / "checkpoints", every=1, keep=1, async_save=False)
    ckpt.save(1, {"x": __import__("numpy").zeros(2)}, {"fingerprint": model_fingerprint(config, {}), "data": {}})
    ckpt.close()
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    args = _args(setup, out)
    args[args.index("--model") + 1] = str(other)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "another model" in err and "num_layers" in err and str(out / "checkpoints" / "1") in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert not (out / "metrics.jsonl").exists()


def test_resume_with_another_batch_size_is_refused(setup, tmp_path, capsys):
    """Same model, but the checkpoint's data position was counted in batches of 4: refused (naming batch_size)."""
    from fastvideo_jax.models.loader.component_loader import TransformerLoader
    from fastvideo_jax.training.checkpoint import TrainCheckpointer, model_fingerprint
    from fastvideo_jax.training.objective import FlowMatchObjective
    from fastvideo_jax.training.optim import OptimConfig
    from fastvideo_jax.training.trainer import Trainer

    trainer = Trainer(TransformerLoader().load(setup / "model" / "transformer", precision="fp32"),
                      FlowMatchObjective(), OptimConfig())
    fingerprint = model_fingerprint(trainer.split.config, trainer.abstract_state().params)
    out = tmp_path / "out"
    ckpt = TrainCheckpointer(out / "checkpoints", every=1, keep=1, async_save=False)
    ckpt.save(2, {"x": __import__("numpy").zeros(2)}, {"fingerprint": fingerprint, "data": {
        "dataset_size": 4, "batch_size": 4, "accum": 1, "seed": 0, "next_step": 2}})
    ckpt.close()
    assert main(_args(setup, out)) == 2
    err = capsys.readouterr().err
    assert "batch_size=4" in err and "batch_size=2" in err and str(out / "checkpoints" / "2") in err


@pytest.mark.parametrize("flag,value,message", [("--max-steps", "0", "max_steps must be a positive integer"),
                                                ("--batch-size", "5", "fewer than batch size")])
def test_bad_numbers_are_refused(setup, tmp_path, capsys, flag, value, message):
    args = _args(setup, tmp_path / "out")
    args[args.index(flag) + 1] = value
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
