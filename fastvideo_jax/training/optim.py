"""The optimizer: optax AdamW on fp32 master parameters, learning-rate warmup + decay, gradient clipping.

FastVideo's choices for Wan finetuning (``torch.optim.AdamW``, eps 1e-8, the diffusers ``get_scheduler`` names,
``clip_grad_norm_`` before the step) with optax's pieces. Schedules (step = optimizer updates done, the first
update uses step 0 as PyTorch's ``LambdaLR`` does):

* ``constant``: ``lr`` throughout (warmup is ignored, as diffusers' ``constant``);
* ``constant_with_warmup``: linear 0 -> lr over ``warmup_steps``, then ``lr``;
* ``linear``: warmup, then linear to 0 at ``total_steps``;
* ``cosine``: warmup, then half a cosine to ``min_lr_ratio * lr`` at ``total_steps`` (0 by default).

Gradient accumulation is the train step's (``trainer.py``: micro-batches summed in fp32 under one scan, then one
update), so the optimizer sees one mean gradient per step.
"""

from __future__ import annotations

import dataclasses
import math

import optax

from fastvideo_jax.errors import UserError

__all__ = ["OptimConfig", "SCHEDULES", "learning_rate_schedule", "make_optimizer"]

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UserError(f"learning rate must be finite and > 0, got {self.learning_rate}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0 or not self.weight_decay >= 0 or not self.max_grad_norm >= 0:
            raise UserError(f"need eps > 0, weight_decay >= 0, max_grad_norm >= 0; got {self.eps}, "
                            f"{self.weight_decay}, {self.max_grad_norm}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"learning-rate schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise UserError(f"warmup steps must be >= 0 and total steps >= 1, got {self.warmup_steps}, "
                            f"{self.total_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def learning_rate_schedule(config: OptimConfig) -> optax.Schedule:
    lr, warmup, total = config.learning_rate, config.warmup_steps, config.total_steps
    if config.schedule == "constant" or (config.schedule == "constant_with_warmup" and warmup == 0):
        return optax.constant_schedule(lr)
    warm = optax.linear_schedule(0.0, lr, max(warmup, 1))
    decay_steps = max(total - warmup, 1)
    if config.schedule == "constant_with_warmup":
        after = optax.constant_schedule(lr)
    elif config.schedule == "linear":
        after = optax.linear_schedule(lr, 0.0, decay_steps)
    else:
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=config.min_lr_ratio)
    return after if warmup == 0 else optax.join_schedules([warm, after], [warmup])


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """Clip by global norm (when ``max_grad_norm`` > 0), then AdamW with the schedule. The state holds fp32
    moments for fp32 parameters (the trainer keeps fp32 master copies of every trainable parameter)."""
    adamw = optax.adamw(learning_rate_schedule(config), b1=config.betas[0], b2=config.betas[1], eps=config.eps,
                        weight_decay=config.weight_decay)
    if config.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
    return adamw
