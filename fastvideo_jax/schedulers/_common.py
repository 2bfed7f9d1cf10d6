"""Pieces both flow schedulers share: diffusers-config validation and the terminal-sigma stretch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["ConfigRules", "resolve_config", "stretch_to_terminal"]

ConfigRules = Mapping[str, tuple[Callable[[Any], bool], str]]


def resolve_config(name: str, defaults: Mapping[str, Any], config: Mapping[str, Any],
                   rules: ConfigRules) -> dict[str, Any]:
    """Merge a diffusers config dict over diffusers' defaults and validate it.

    Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) are ignored, unknown keys
    and values failing ``rules[key]`` raise a ``ValueError`` naming the key.  Keys without a rule
    have no effect on the supported configuration and are accepted as-is.
    """
    merged = dict(defaults)
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key not in defaults:
            raise ValueError(f"{name}: unknown config key {key!r}")
        merged[key] = value
    for key, (is_ok, supported) in rules.items():
        try:
            ok = bool(is_ok(merged[key]))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{name}: unsupported config option {key}={merged[key]!r} "
                             f"(supported: {supported})")
    return merged


def stretch_to_terminal(sigmas: np.ndarray, shift_terminal: float) -> np.ndarray:
    """Stretch a decreasing sigma schedule so that it ends exactly at ``shift_terminal``."""
    one_minus = 1.0 - sigmas
    scale = one_minus[-1] / (1.0 - shift_terminal)
    return 1.0 - one_minus / scale


def host_table(a: Any, dtype: Any = None) -> jax.Array:
    """A NumPy schedule table on the default device without a compile (``jnp.asarray`` of a host array compiles a
    copy per new shape on some jax versions, i.e. once per step count)."""
    return jax.device_put(np.asarray(a, dtype))
