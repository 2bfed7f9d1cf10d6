"""Frozen configuration bases shared by every component (DiT, encoder, VAE).

``ArchConfig`` holds what a checkpoint's ``config.json`` fixes (the architecture); it is immutable and is only
ever rebuilt from a ``config.json`` by ``update_model_arch``. ``ModelConfig`` wraps an ArchConfig with our own
knobs (precision, attention backend, ...); attribute reads fall through to the ArchConfig, so
``cfg.num_layers`` works on either.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

# Keys that hub tooling writes into config.json and that describe no architecture.
HUB_METADATA_KEYS = frozenset(
    {
        "_class_name",
        "_diffusers_version",
        "_name_or_path",
        "_commit_hash",
        "transformers_version",
        "model_type",
        "torch_dtype",
        "dtype",
        "_attn_implementation_autoset",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "use_cache",
    }
)

MATMUL_PRECISIONS = frozenset({None, "default", "high", "highest"})

A = TypeVar("A", bound="ArchConfig")
M = TypeVar("M", bound="ModelConfig")


def _freeze(value: Any) -> Any:
    """JSON values made hashable-ish and immutable: lists become tuples, dicts read-only mappings."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    return value


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Architecture fields, named exactly as the checkpoint's ``config.json`` keys."""

    # config.json keys that no field of this class takes; kept (not silently lost) and logged.
    unrecognized: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False
    )

    def __post_init__(self) -> None:
        """Subclasses derive fields here (through ``object.__setattr__``) and validate."""

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(
            f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_") and not f.metadata.get("internal")
        )

    def update_model_arch(self: A, config: Mapping[str, Any]) -> A:
        """A copy with the fields named in a ``config.json`` dict replaced.

        Hub metadata keys are dropped. Keys that match no field are reported in a warning and stored in
        ``unrecognized`` so a caller can still see them.
        """
        fields = self.field_names() - {"unrecognized"}
        known: dict[str, Any] = {}
        unknown: dict[str, Any] = dict(self.unrecognized)
        for key, value in config.items():
            if key in HUB_METADATA_KEYS:
                continue
            if key in fields:
                known[key] = _freeze(value)
            else:
                unknown[key] = value
        if unknown:
            logger.warning("%s: config.json keys not used by this architecture: %s", type(self).__name__, sorted(unknown))
        return dataclasses.replace(self, **known, unrecognized=MappingProxyType(unknown))

    def to_dict(self) -> dict[str, Any]:
        """The architecture as ``config.json`` would hold it (derived and private fields left out)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name not in self.field_names() or f.name == "unrecognized":
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def derived(default: Any = None) -> Any:
    """A field computed in ``__post_init__`` from other fields, never read from config.json."""
    return dataclasses.field(default=default, init=False, metadata={"internal": True})


def internal(default: Any) -> Any:
    """A field of ours (a name mapping, say) that config.json never sets; subclasses override its default."""
    return dataclasses.field(default=default, metadata={"internal": True}, repr=False)


# An ordered name mapping: (anchored regex, target). A target is a replacement string, or
# (replacement, part_index, num_parts) when several checkpoint tensors merge into one parameter.
NameMapping = tuple[tuple[str, "str | tuple[str, int, int]"], ...]


@dataclasses.dataclass(frozen=True)
class MappedArchConfig(ArchConfig):
    """What the converter reads from an architecture: class data, never taken from config.json."""

    param_names_mapping: NameMapping = internal(())  # checkpoint name -> our name
    reverse_param_names_mapping: NameMapping = internal(())  # our name -> checkpoint name (export)
    # Prefixes whose numbered children are stacked into one scanned parameter tree ("blocks.N.*").
    scanned_prefixes: tuple[str, ...] = internal(())
    # Checkpoint tensors consumed and dropped by name (e.g. ones the original also ignores on load).
    ignored_param_patterns: tuple[str, ...] = internal(())
    # Checkpoint tensors dropped WITH a warning, as (pattern, why): weights of a feature not implemented yet, so
    # the model runs without them (the loader says which and why; they are not in an exported checkpoint).
    ignored_param_warnings: tuple[tuple[str, str], ...] = internal(())
    # (regex, ((field, value), ...)): a checkpoint holding a tensor whose name matches needs the model built with
    # these config fields to take it (e.g. an attention mode with its own weights); read by the converter, which
    # must carry every tensor across.
    checkpoint_implied_config: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = internal(())
    # (regex, hint): when loading fails on a checkpoint tensor whose name matches (unexpected or missing), the
    # error carries the hint (e.g. a tensor only one attention mode of the model has).
    unexpected_param_hints: tuple[tuple[str, str], ...] = internal(())
    # Checkpoint names that are tied copies of another tensor: dropped when that tensor is present too.
    tied_param_names: tuple[str, ...] = internal(())


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Our own per-component knobs around an ``arch_config``."""

    arch_config: ArchConfig = dataclasses.field(default_factory=ArchConfig)
    prefix: str = ""
    # Precision of every matmul / conv / einsum in the component's forward (``jax.default_matmul_precision``):
    # "highest" (full fp32), "high" (bf16_3x / TF32), "default" (the platform's fastest: one bf16 pass on TPU),
    # or None for the component's default: "highest" when its ``precision`` is "fp32", else "default".
    matmul_precision: str | None = None

    def __post_init__(self) -> None:
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"{type(self).__name__}: matmul_precision must be one of "
                             f"{sorted(p for p in MATMUL_PRECISIONS if p)} or None, got {self.matmul_precision!r}")

    def resolved_matmul_precision(self) -> str:
        """The matmul precision the component's forward runs at (see ``matmul_precision``)."""
        if self.matmul_precision is not None:
            return self.matmul_precision
        return "highest" if getattr(self, "precision", None) == "fp32" else "default"

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: fall through to the architecture.
        if name.startswith("__") or name == "arch_config":
            raise AttributeError(name)
        try:
            return getattr(self.arch_config, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (nor has its arch_config)") from None

    def update_model_arch(self: M, config: Mapping[str, Any]) -> M:
        return dataclasses.replace(self, arch_config=self.arch_config.update_model_arch(config))

    def update_model_config(self: M, **overrides: Any) -> M:
        """A copy with our knobs replaced; an unknown knob is an error, unlike config.json keys."""
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise AttributeError(f"{type(self).__name__} has no option(s) {bad}; options are {sorted(names)}")
        return dataclasses.replace(self, **overrides)
