"""Training: FastVideo's flow-matching tables, the optimizer's schedules, bf16 compute, overfitting two toy clips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastvideo_jax.errors import UserError
from fastvideo_jax.models.loader.component_loader import TransformerLoader
from fastvideo_jax.testing.tiny_checkpoints import write_random_dit
from fastvideo_jax.training.objective import FlowMatchObjective
from fastvideo_jax.training.optim import OptimConfig, learning_rate_schedule
from fastvideo_jax.training.trainer import Trainer


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return write_random_dit(tmp_path_factory.mktemp("dit"), "tiny", seed=0)


def _clips(seed=0, n=2):
    rng = np.random.default_rng(seed)
    return {"latents": rng.standard_normal((n, 16, 2, 4, 4)).astype(np.float32),
            "prompt_embeds": rng.standard_normal((n, 8, 32)).astype(np.float32)}


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_schedule_is_diffusers_flow_match_euler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    timesteps, sigmas = FlowMatchObjective(flow_shift=shift).schedule()
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())


def test_timestep_sampling_schemes():
    key = jax.random.key(0)
    for scheme in ("uniform", "logit_normal", "mode"):
        idx = np.asarray(FlowMatchObjective(weighting_scheme=scheme).sample_indices(key, 4096))
        assert idx.min() >= 0 and idx.max() <= 999
        assert len(np.unique(idx)) > 500, scheme
    # logit-normal concentrates on the middle of the schedule; uniform does not
    def mid(scheme):
        idx = np.asarray(FlowMatchObjective(weighting_scheme=scheme).sample_indices(key, 4096))
        return np.mean(np.abs(idx - 500) < 250)

    assert mid("logit_normal") > 0.65 > 0.55 > mid("uniform") > 0.45
    with pytest.raises(UserError, match="weighting_scheme"):
        FlowMatchObjective(weighting_scheme="cosmap")


def test_noise_at_is_the_flow_matching_target():
    obj = FlowMatchObjective()
    x = jnp.ones((2, 1, 1, 1, 1)) * 2.0
    n = jnp.ones_like(x) * -1.0
    noised = obj.noise_at(x, n, jnp.asarray([0, 999]), jnp.zeros((2, 1, 1)))
    np.testing.assert_allclose(noised.sigmas, [1.0, 0.001], rtol=1e-6)
    np.testing.assert_allclose(noised.timesteps, [1000.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(noised.noisy.ravel(), [-1.0, 0.999 * 2 - 0.001], rtol=1e-6)
    # a perfect prediction (noise - latents) has zero loss, one off by 1 everywhere has loss 1
    assert float(obj.loss(n - x, x, noised)) == 0.0
    assert float(obj.loss(n - x + 1, x, noised)) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["constant_with_warmup", "linear", "cosine"])
def test_lr_schedules_match_diffusers(name):
    import torch
    from diffusers.optimization import get_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ref = get_scheduler(name, opt, num_warmup_steps=3, num_training_steps=10)
    ours = learning_rate_schedule(OptimConfig(learning_rate=1e-3, schedule=name, warmup_steps=3, total_steps=10))
    for step in range(10):
        assert float(ours(step)) == pytest.approx(ref.get_last_lr()[0], rel=1e-6, abs=1e-12), step
        opt.step()
        ref.step()


def test_overfits_two_clips(dit_dir, monkeypatch):
    """The train step memorises two toy clips: with the noise and timesteps held fixed (so the target is
    learnable exactly), the loss falls >= 10x within 100 AdamW steps."""
    clips = _clips(seed=3)
    noise = jnp.asarray(np.random.default_rng(4).standard_normal(clips["latents"].shape).astype(np.float32))
    indices = jnp.asarray([300, 700])
    monkeypatch.setattr(FlowMatchObjective, "noise_batch",
                        lambda self, key, latents, context: self.noise_at(latents, noise, indices, context))
    model = TransformerLoader().load(dit_dir, precision="fp32")
    trainer = Trainer(model, FlowMatchObjective(), OptimConfig(learning_rate=3e-3, total_steps=100))
    state = trainer.init_state(seed=0)
    batch = trainer.place_batch(clips)
    losses = []
    for _ in range(100):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
        if losses[-1] <= losses[0] / 10:
            break
    assert losses[-1] <= losses[0] / 10, f"loss {losses[0]:.4f} -> {losses[-1]:.4f} after {len(losses)} steps"
    assert int(state.step) == len(losses)


def test_bf16_compute_keeps_fp32_masters(dit_dir):
    """precision="bf16": the forward runs on bf16 weights (norms/modulation fp32, as the model's policy), the
    masters, gradients and Adam moments are fp32, and the loss is the fp32 loss to bf16 accuracy."""
    clips = _clips(seed=1)
    losses = {}
    for precision in ("fp32", "bf16"):
        model = TransformerLoader().load(dit_dir, precision=precision)
        trainer = Trainer(model, FlowMatchObjective(), OptimConfig(learning_rate=1e-3))
        state = trainer.init_state(seed=0)
        merged = trainer.model(state)
        assert all(v.dtype == jnp.float32 for v in state.params.values())
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
        kernel_dtype = merged.blocks.to_q.kernel[...].dtype
        assert kernel_dtype == (jnp.bfloat16 if precision == "bf16" else jnp.float32)
        assert merged.blocks.scale_shift_table[...].dtype == jnp.float32
        state, metrics = trainer.step(state, trainer.place_batch(clips))
        losses[precision] = float(metrics["loss"])
        assert all(v.dtype == jnp.float32 for v in state.params.values())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
