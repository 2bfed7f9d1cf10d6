"""One training step against a PyTorch reference of the same objective on diffusers' WanTransformer3DModel with
the same weights, timesteps and noise (fp32): the loss, every parameter's gradient, and the clipped AdamW
update (<= 1e-4 relative)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters import NameMapper, export_params
from fastvideo_jax.models.loader.component_loader import TransformerLoader
from fastvideo_jax.training.objective import FlowMatchObjective
from fastvideo_jax.training.optim import OptimConfig
from fastvideo_jax.training.trainer import Trainer
from tests.oracles import errors, tiny_wan_dit

OPTIM = OptimConfig(learning_rate=1e-3, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.1, max_grad_norm=0.05)


@pytest.fixture
def oracle(tmp_path):
    return tmp_path, tiny_wan_dit(tmp_path).float()


def _inputs():
    rng = np.random.default_rng(5)
    latents = rng.standard_normal((2, 16, 3, 4, 6)).astype(np.float32)
    noise = rng.standard_normal(latents.shape).astype(np.float32)
    context = rng.standard_normal((2, 7, 32)).astype(np.float32)
    return latents, noise, context, np.asarray([120, 830])


def _to_torch_names(model, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    arch = model.config.arch_config
    return export_params({tuple(k.split(".")): np.asarray(v) for k, v in flat.items()},
                         NameMapper(arch.reverse_param_names_mapping), arch.scanned_prefixes)


def _torch_step(ref, latents, noise, context, indices, shift=1.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    t = sched.timesteps[torch.as_tensor(indices)]
    sigma = sched.sigmas[torch.as_tensor(indices)].reshape(-1, 1, 1, 1, 1)
    x, n = torch.from_numpy(latents), torch.from_numpy(noise)
    noisy = (1.0 - sigma) * x + sigma * n
    ref.zero_grad()
    pred = ref(noisy, timestep=t, encoder_hidden_states=torch.from_numpy(context), return_dict=False)[0]
    loss = torch.mean((pred.float() - (n - x).float()) ** 2)
    loss.backward()
    return loss


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_loss_gradients_and_update_match_pytorch(oracle, shift):
    d, ref = oracle
    latents, noise, context, indices = _inputs()
    ref.train()
    model = TransformerLoader().load(d, precision="fp32")
    objective = FlowMatchObjective(flow_shift=shift)
    trainer = Trainer(model, objective, OPTIM)
    params = trainer.split.master_params()
    noised = objective.noise_at(jnp.asarray(latents), jnp.asarray(noise), jnp.asarray(indices), jnp.asarray(context))

    def loss_fn(p):
        return objective.loss(trainer.predict(p, noised), jnp.asarray(latents), noised)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    ref_loss = _torch_step(ref, latents, noise, context, indices, shift)
    assert float(loss) == pytest.approx(ref_loss.item(), rel=1e-4)

    ours = _to_torch_names(model, jax.device_get(grads))
    named = dict(ref.named_parameters())
    assert set(ours) == set(named)
    for name, p in named.items():
        err, rel = errors(ours[name], p.grad.numpy())
        assert rel <= 1e-4, f"grad {name}: max-abs {err:.3e}, relative {rel:.3e}"

    # one optimizer step: clip to the global norm, AdamW with decoupled weight decay
    assert float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))) > OPTIM.max_grad_norm  # clips
    updates, _ = trainer.tx.update(grads, trainer.tx.init(params), params)
    ours_delta = _to_torch_names(model, jax.device_get(updates))
    torch.nn.utils.clip_grad_norm_(ref.parameters(), OPTIM.max_grad_norm)
    opt = torch.optim.AdamW(ref.parameters(), lr=OPTIM.learning_rate, betas=OPTIM.betas, eps=OPTIM.eps,
                            weight_decay=OPTIM.weight_decay)
    before = {n: p.detach().clone().numpy() for n, p in named.items()}
    opt.step()
    for name, p in named.items():  # torch's delta carries the rounding of p + delta: one ulp of p allowed
        delta_ref = p.detach().numpy() - before[name]
        excess = np.abs(ours_delta[name] - delta_ref) - 1e-4 * OPTIM.learning_rate - np.spacing(np.abs(before[name]))
        assert excess.max() <= 0, f"update {name}: off by {excess.max():.3e} beyond 1e-4 x lr + 1 ulp"
