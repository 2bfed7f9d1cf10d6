"""Tensor layout transforms between PyTorch checkpoints and Flax parameters, chosen by tensor kind.

The kind follows from the Flax leaf a tensor fills: ``kernel`` of rank 2 is a linear (``[out, in]`` ->
``[in, out]``), ``kernel`` of rank 3/4/5 a convolution (``O I *K`` -> ``*K I O``); ``scale``, ``embedding``,
``bias`` and raw parameters keep their layout. PyTorch's ``weight`` is stored under ``kernel`` (linear, conv),
``scale`` (norms) or ``embedding`` (embedding tables).
"""

from __future__ import annotations

import numpy as np

__all__ = ["WEIGHT_LEAVES", "to_flax", "from_flax", "flax_shape", "torch_leaf_name"]

# Flax leaf names that hold a PyTorch ``weight``, in the order they are tried.
WEIGHT_LEAVES = ("kernel", "scale", "embedding", "weight")


def _perm(leaf: str, ndim: int) -> tuple[int, ...] | None:
    if leaf != "kernel" or ndim < 2:
        return None
    if ndim == 2:
        return (1, 0)
    # conv: (O, I, *K) -> (*K, I, O)
    return tuple(range(2, ndim)) + (1, 0)


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


def flax_shape(leaf: str, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
    perm = _perm(leaf, len(torch_shape))
    return tuple(torch_shape) if perm is None else tuple(torch_shape[i] for i in perm)


def to_flax(arr: np.ndarray, leaf: str) -> np.ndarray:
    """PyTorch layout -> Flax layout (a view where numpy allows; the caller's copy does the work)."""
    perm = _perm(leaf, arr.ndim)
    return arr if perm is None else arr.transpose(perm)


def from_flax(arr: np.ndarray, leaf: str) -> np.ndarray:
    perm = _perm(leaf, arr.ndim)
    return arr if perm is None else arr.transpose(_inverse(perm))


def torch_leaf_name(leaf: str) -> str:
    return "weight" if leaf in WEIGHT_LEAVES else leaf
