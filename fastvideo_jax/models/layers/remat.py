"""Rematerialisation (activation checkpointing) policies for scanned transformer blocks, by name.

A training step keeps every activation of every block alive for the backward pass unless the block is
rematerialised: its forward runs again during the backward, keeping only what the policy saves.

* ``none``: no remat (fastest, most memory; inference never differentiates, so it is the default);
* ``full``: save nothing inside a block, only its input (the scan carry): least memory, one extra forward;
* ``dots``: save the outputs of matmuls that have no batch dimension (the projections' outputs are saved,
  attention's batched products and elementwise work are recomputed): between the two.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from fastvideo_jax.configs.models.dits.base import REMAT_POLICY_NAMES

__all__ = ["REMAT_POLICIES", "check_remat", "remat_block"]

REMAT_POLICIES: dict[str, Callable | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(name: str, owner: str = "remat") -> str:
    if name not in REMAT_POLICY_NAMES:
        raise ValueError(f"{owner}: remat policy {name!r} is not one of {', '.join(REMAT_POLICY_NAMES)}")
    return name


def remat_block(fn: Callable, name: str) -> Callable:
    """``fn`` (a scan body over an NNX block) rematerialised under the policy ``name`` (``none``: ``fn`` itself).
    ``prevent_cse=False``: inside a scan the loop already keeps XLA from merging the recomputation away."""
    if check_remat(name) == "none":
        return fn
    return nnx.remat(fn, policy=REMAT_POLICIES[name], prevent_cse=False)
