"""What a training run leaves behind: validation videos from the pipeline, metrics, and the exported DiT, a
Diffusers folder that diffusers loads and that holds exactly the final checkpoint's fp32 parameters."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import torch
from flax import nnx

from fastvideo_jax.entrypoints.cli import main
from fastvideo_jax.models.loader.component_loader import TransformerLoader
from fastvideo_jax.testing.tiny_pipeline import write_tiny_wan_pipeline
from fastvideo_jax.testing.toy_dataset import write_toy_dataset
from fastvideo_jax.training.params import param_key
from tests.oracles import dit_call, errors, torch_out


def test_validation_videos_metrics_and_export(tmp_path, capsys):
    from diffusers import WanTransformer3DModel

    write_tiny_wan_pipeline(tmp_path / "model")
    write_toy_dataset(tmp_path / "data", count=3)
    out = tmp_path / "run"
    args = ["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--output-dir", str(out),
            "--max-steps", "2", "--batch-size", "1", "--grad-accum", "2", "--learning-rate", "1e-2",
            "--checkpoint-every", "2", "--validate-every", "2", "--validation-prompt", "a red ball",
            "--validation-size", "32x32x5", "--validation-steps", "2", "--mesh", "data=1", "--no-progress"]
    assert main(args) == 0
    assert "trained to step 2" in capsys.readouterr().out
    video = out / "validation" / "step2_0.mp4"
    assert video.is_file() and video.stat().st_size > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and abs(r["lr"] - 1e-2) < 1e-9 and r["steps_per_s"] > 0 for r in records)

    # the export holds the final checkpoint's fp32 masters, and differs from the weights it started from
    saved = ocp.CheckpointManager(out / "checkpoints", item_names=("state", "meta")).restore(
        2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    exported = TransformerLoader().load(out / "transformer", precision="fp32")
    start = TransformerLoader().load(tmp_path / "model" / "transformer", precision="fp32")
    flat = {param_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(exported, nnx.Param))}
    first = {param_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(start, nnx.Param))}
    assert set(flat) == set(saved["params"])
    for key, value in saved["params"].items():
        np.testing.assert_array_equal(flat[key], np.asarray(value), err_msg=key)
    assert not np.array_equal(flat["blocks.to_q.kernel"], first["blocks.to_q.kernel"])

    # diffusers reads the folder and computes what our loaded export computes
    ref = WanTransformer3DModel.from_pretrained(out / "transformer").float().eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 2, 4, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 5, 32)).astype(np.float32)
    t = np.asarray([400.0], np.float32)
    theirs = torch_out(ref, torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx))
    ours = np.asarray(dit_call(exported, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)))
    assert errors(ours, theirs)[1] <= 1e-4
