"""LoRA training through the trainer: only adapters are trainable (``trainable=LORA_FILTER``), the loss falls on
two toy clips, the base weights stay bit for bit, and the trained adapters saved as a LoRA file give the trained
model's output when loaded into a fresh DiT."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastvideo_jax.models.layers.lora import LORA_FILTER, inject_lora
from fastvideo_jax.models.loader.component_loader import TransformerLoader
from fastvideo_jax.models.loader.lora_io import load_lora, save_lora
from fastvideo_jax.testing.tiny_checkpoints import write_random_dit
from fastvideo_jax.training.objective import FlowMatchObjective
from fastvideo_jax.training.optim import OptimConfig
from fastvideo_jax.training.trainer import Trainer


def test_lora_training_through_the_trainer(tmp_path, monkeypatch):
    dit_dir = write_random_dit(tmp_path / "dit", "tiny", seed=0)
    rng = np.random.default_rng(3)
    clips = {"latents": rng.standard_normal((2, 16, 2, 4, 4)).astype(np.float32),
             "prompt_embeds": rng.standard_normal((2, 8, 32)).astype(np.float32)}
    noise = jnp.asarray(rng.standard_normal(clips["latents"].shape).astype(np.float32))
    indices = jnp.asarray([300, 700])  # noise and timesteps held fixed: the target is learnable
    monkeypatch.setattr(FlowMatchObjective, "noise_batch",
                        lambda self, key, latents, context: self.noise_at(latents, noise, indices, context))

    model = TransformerLoader().load(dit_dir, precision="fp32")
    inject_lora(model, rank=4, alpha=4, rngs=nnx.Rngs(0))
    base = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    trainer = Trainer(model, FlowMatchObjective(), OptimConfig(learning_rate=1e-2, total_steps=40),
                      trainable=LORA_FILTER)
    assert trainer.split.keys and all(".lora." in k for k in trainer.split.keys), trainer.split.keys
    state = trainer.init_state(seed=0)
    batch = trainer.place_batch(clips)
    losses = []
    for _ in range(40):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.75 * losses[0], f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"

    trained = trainer.model(state)
    for p, v in nnx.to_flat_state(nnx.state(trained, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(v[...]), base[p], err_msg=str(p))
    x, ctx = jnp.asarray(clips["latents"]), jnp.asarray(clips["prompt_embeds"])
    t = jnp.asarray([300.0, 700.0])
    want = np.asarray(trained.forward(x, t, ctx))
    save_lora(trained, tmp_path / "lora")
    fresh = TransformerLoader().load(dit_dir, precision="fp32")
    load_lora(fresh, tmp_path / "lora", merge=False)
    got = np.asarray(fresh.forward(x, t, ctx))
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-5, f"trained LoRA saved and reloaded: relative {rel:.3e}"


def test_train_cli_lora_writes_a_lora_generate_reads(tmp_path, capsys):
    """`fastvideo-jax train --lora-rank 2` trains adapters only and writes a LoRA folder that `generate --lora`
    takes; the base DiT is not exported."""
    from fastvideo_jax.entrypoints.cli import main
    from fastvideo_jax.models.loader.lora_io import read_lora
    from fastvideo_jax.testing.tiny_pipeline import write_tiny_wan_pipeline
    from fastvideo_jax.testing.toy_dataset import write_toy_dataset

    write_tiny_wan_pipeline(tmp_path / "model")
    write_toy_dataset(tmp_path / "data", count=2)
    out = tmp_path / "run"
    code = main(["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--output-dir",
                 str(out), "--max-steps", "2", "--batch-size", "2", "--precision", "fp32", "--mesh", "data=1",
                 "--no-progress", "--learning-rate", "1e-3", "--lora-rank", "2", "--lora-alpha", "4"])
    assert code == 0, capsys.readouterr().err
    assert "LoRA written to" in capsys.readouterr().out
    assert not (out / "transformer").exists()
    model = TransformerLoader().load(tmp_path / "model" / "transformer", precision="fp32")
    weights = read_lora(out / "lora", model)
    assert "blocks.to_q" in weights and "blocks.ffn.fc_out" in weights
    assert np.abs(weights["blocks.to_q"].B).max() > 0  # trained away from PEFT's zero init
    code = main(["generate", "--model", str(tmp_path / "model"), "--prompt", "a toy", "--lora", str(out / "lora"),
                 "--output", str(tmp_path / "v.mp4"), "--height", "32", "--width", "48", "--num-frames", "5",
                 "--num-inference-steps", "2", "--no-progress"])
    assert code == 0 and (tmp_path / "v.mp4").is_file()
    code = main(["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--output-dir",
                 str(tmp_path / "bad"), "--max-steps", "1", "--lora-alpha", "4"])
    assert code == 2 and "lora_alpha" in capsys.readouterr().err
