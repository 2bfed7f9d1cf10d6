"""Strict conversion between checkpoint tensors (Diffusers/Transformers names) and Flax parameter trees.

Conversion happens in two steps so that nothing is read before everything is known to fit:

1. ``build_plan`` maps every checkpoint name (through the regex mapping) onto a leaf of the abstract Flax
   state, and checks shapes from the safetensors headers alone. Unknown, missing, duplicated and mis-shaped
   names are gathered and raised together in one ``ConversionError``.
2. ``ConversionPlan.leaf_array`` reads the tensors of one leaf, transforms them (linear ``.T``, conv
   ``OIDHW -> DHWIO``), merges split parts and writes them into a preallocated buffer of the target dtype, one
   layer row at a time for scanned (stacked) parameters, so the cast happens in the same copy.

``export_params`` goes the other way through the reverse mapping.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from converters.mapping import NameMapper
from converters.transforms import WEIGHT_LEAVES, flax_shape, from_flax, to_flax, torch_leaf_name

__all__ = [
    "ConversionError",
    "LeafSpec",
    "LeafPlan",
    "ConversionPlan",
    "assemble_row",
    "build_plan",
    "export_params",
]

Path = tuple  # an NNX state path, e.g. ("blocks", "to_q", "kernel")


class ConversionError(ValueError):
    """A checkpoint that does not fit the model; the message lists every offending name."""


@dataclass(frozen=True)
class LeafSpec:
    """Shape and dtype of one parameter of the abstract model; ``stacked`` if its axis 0 is the layer axis."""

    shape: tuple[int, ...]
    dtype: np.dtype
    stacked: bool = False


@dataclass(frozen=True)
class _Source:
    key: str
    part: int | None
    num_parts: int | None


@dataclass
class LeafPlan:
    """How one parameter is filled: per layer row (or ``None`` for an unstacked leaf) the tensors it takes."""

    path: Path
    spec: LeafSpec
    rows: dict[int | None, list[_Source]] = field(default_factory=dict)

    @property
    def leaf(self) -> str:
        return str(self.path[-1])


@dataclass
class ConversionPlan:
    leaves: dict[Path, LeafPlan]
    ignored: list[str]

    def leaf_array(self, path: Path, read: Callable[[str], np.ndarray], index: tuple[slice, ...] | None = None
                   ) -> np.ndarray:
        """One parameter (or the block ``index`` of it, one slice per axis) as a host array in the target dtype,
        filled one source row at a time so the cast happens in the same copy."""
        plan = self.leaves[path]
        index = index or tuple(slice(0, n) for n in plan.spec.shape)
        return self.leaf_blocks(path, read, [index])[0]

    def leaf_blocks(self, path: Path, read: Callable[[str], np.ndarray], indices: list[tuple[slice, ...]]
                    ) -> list[np.ndarray]:
        """The blocks ``indices`` (one slice per axis each) of one parameter, in the target dtype, filled in one
        pass over its source rows: each source tensor is read once and every block that covers it is cut from
        it (the cast happens in that copy)."""
        plan = self.leaves[path]
        outs = [np.empty([s.stop - s.start for s in index], dtype=plan.spec.dtype) for index in indices]
        for layer, sources in plan.rows.items():
            wanted = [i for i, index in enumerate(indices) if layer is None or index[0].start <= layer < index[0].stop]
            if not wanted:
                continue
            row = assemble_row(sources, plan.leaf, read)
            for i in wanted:
                index = indices[i]
                if layer is None:
                    outs[i][...] = row[index]
                else:
                    outs[i][layer - index[0].start] = row[index[1:]]
            del row
        return outs


def assemble_row(sources: list[_Source], leaf: str, read: Callable[[str], np.ndarray]) -> np.ndarray:
    """One row (a layer, or the whole of an unstacked parameter) in Flax layout: read, merged, transformed."""
    if len(sources) == 1 and sources[0].part is None:
        return to_flax(read(sources[0].key), leaf)
    parts = sorted(sources, key=lambda s: s.part)
    return to_flax(np.concatenate([read(s.key) for s in parts], axis=0), leaf)


def _split_scanned(name: str, scanned_prefixes: Iterable[str]) -> tuple[str, int | None, str]:
    """``blocks.3.to_q.weight`` -> (``blocks``, 3, ``to_q.weight``) when ``blocks`` is a scanned prefix."""
    for prefix in scanned_prefixes:
        m = re.match(re.escape(prefix) + r"\.(\d+)\.(.+)$", name)
        if m:
            return prefix, int(m.group(1)), m.group(2)
    return "", None, name


def _index_abstract(abstract: Mapping[Path, LeafSpec]) -> dict[str, Path]:
    return {".".join(str(p) for p in path): path for path in abstract}


def _resolve(name: str, index: Mapping[str, Path], scanned_prefixes) -> tuple[Path, int | None] | None:
    prefix, layer, rest = _split_scanned(name, scanned_prefixes)
    module, _, leaf = rest.rpartition(".")
    base = ".".join(p for p in (prefix, module) if p)
    candidates = WEIGHT_LEAVES if leaf == "weight" else (leaf,)
    for cand in candidates:
        path = index.get(f"{base}.{cand}" if base else cand)
        if path is not None:
            return path, layer
    return None


def build_plan(
    tensor_shapes: Mapping[str, tuple[int, ...]],
    abstract: Mapping[Path, LeafSpec],
    mapper: Callable,
    scanned_prefixes: Iterable[str] = (),
    ignored_patterns: Iterable[str] = (),
    source_name: str = "checkpoint",
    tied_names: Iterable[str] = (),
) -> ConversionPlan:
    """Map every checkpoint tensor onto the abstract parameters, or raise one error listing all problems.

    ``tied_names``: checkpoint names that are tied copies of another tensor (e.g. T5's
    ``encoder.embed_tokens.weight`` of ``shared.weight``): alone they fill their parameter; next to the
    tensor they copy they are dropped, as PyTorch's weight tying does.
    """
    scanned_prefixes = tuple(scanned_prefixes)
    tied_names = frozenset(tied_names)
    ignored_res = [re.compile(p) for p in ignored_patterns]
    index = _index_abstract(abstract)
    leaves = {path: LeafPlan(path, spec) for path, spec in abstract.items()}
    unknown, duplicates, ignored = [], [], []
    for key in sorted(tensor_shapes):
        if any(r.match(key) for r in ignored_res):
            ignored.append(key)
            continue
        mapped = mapper(key)
        hit = _resolve(mapped.name, index, scanned_prefixes)
        if hit is None:
            unknown.append(key if mapped.name == key else f"{key} (mapped to {mapped.name})")
            continue
        path, layer = hit
        plan = leaves[path]
        if plan.spec.stacked != (layer is not None) or (layer is not None and layer >= plan.spec.shape[0]):
            unknown.append(f"{key} (layer index does not fit parameter {'.'.join(map(str, path))} {plan.spec.shape})")
            continue
        row = plan.rows.setdefault(layer, [])
        clash = next((s for s in row if s.part == mapped.part), None)
        if clash is not None and clash.key in tied_names and key not in tied_names:
            row.remove(clash)  # the tied copy came first (sorted order): keep the tensor it copies
            ignored.append(clash.key)
        elif clash is not None and key in tied_names:
            ignored.append(key)
            continue
        elif clash is not None:
            duplicates.append(f"{key} (a second tensor for {'.'.join(map(str, path))}, layer {layer})")
            continue
        row.append(_Source(key, mapped.part, mapped.num_parts))
    missing, shapes = _check_rows(leaves, tensor_shapes)
    _raise_if_any(source_name, unknown=unknown, duplicates=duplicates, missing=missing, shapes=shapes)
    return ConversionPlan(leaves, ignored)


def _check_rows(leaves: Mapping[Path, LeafPlan], tensor_shapes) -> tuple[list[str], list[str]]:
    missing, shapes = [], []
    for path, plan in leaves.items():
        dotted = ".".join(str(p) for p in path)
        expected_layers = range(plan.spec.shape[0]) if plan.spec.stacked else [None]
        row_shape = plan.spec.shape[1:] if plan.spec.stacked else plan.spec.shape
        for layer in expected_layers:
            where = dotted if layer is None else f"{dotted}[layer {layer}]"
            sources = plan.rows.get(layer)
            if not sources:
                missing.append(where)
                continue
            total = sources[0].num_parts
            if total is not None and sorted(s.part for s in sources) != list(range(total)):
                have = sorted(s.part for s in sources)
                missing.append(f"{where} (merged from {total} parts, found parts {have})")
                continue
            torch_shapes = [tuple(tensor_shapes[s.key]) for s in sorted(sources, key=lambda s: s.part or 0)]
            if len({s[1:] for s in torch_shapes}) != 1:
                shapes.append(f"{where}: parts have shapes {torch_shapes} that do not concatenate")
                continue
            merged = (sum(s[0] for s in torch_shapes),) + torch_shapes[0][1:] if len(torch_shapes) > 1 else torch_shapes[0]
            got = flax_shape(plan.leaf, merged)
            if tuple(got) != tuple(row_shape):
                keys = ", ".join(s.key for s in sources)
                shapes.append(f"{keys}: shape {merged} gives {got} for {where}, expected {tuple(row_shape)}")
    return missing, shapes


def _raise_if_any(source_name: str, **problems: list[str]) -> None:
    titles = {
        "unknown": "unexpected checkpoint tensors (no model parameter takes them)",
        "duplicates": "duplicate tensors",
        "missing": "model parameters the checkpoint does not fill",
        "shapes": "shape mismatches",
    }
    lines = []
    for kind, names in problems.items():
        if names:
            shown = names[:50] + ([f"... and {len(names) - 50} more"] if len(names) > 50 else [])
            lines.append(f"{titles[kind]} ({len(names)}):\n  " + "\n  ".join(shown))
    if lines:
        raise ConversionError(f"{source_name} does not match the model:\n" + "\n".join(lines))


def export_params(
    params: Mapping[Path, np.ndarray],
    reverse_mapper: NameMapper,
    scanned_prefixes: Iterable[str] = (),
) -> dict[str, np.ndarray]:
    """Flax parameters -> checkpoint-named tensors in PyTorch layout (the inverse of ``build_plan``)."""
    scanned_prefixes = tuple(scanned_prefixes)
    out: dict[str, np.ndarray] = {}
    for path, value in params.items():
        names = [str(p) for p in path]
        leaf = names[-1]
        torch_leaf = torch_leaf_name(leaf)
        stacked_prefix = next((p for p in scanned_prefixes if ".".join(names).startswith(p + ".")), None)
        if stacked_prefix is None:
            rows = [(".".join(names[:-1] + [torch_leaf]), np.asarray(value))]
        else:
            rest = ".".join(names[len(stacked_prefix.split(".")) : -1] + [torch_leaf])
            rows = [(f"{stacked_prefix}.{i}.{rest}", np.asarray(value[i])) for i in range(value.shape[0])]
        for name, arr in rows:
            torch_arr = np.ascontiguousarray(from_flax(arr, leaf))
            mapped = reverse_mapper(name)
            if mapped.split is None:
                _put(out, mapped.name, torch_arr)
            else:
                if torch_arr.shape[0] % len(mapped.split):
                    raise ConversionError(f"{name}: axis 0 of {torch_arr.shape} does not split into {mapped.split}")
                for part_name, chunk in zip(mapped.split, np.split(torch_arr, len(mapped.split), axis=0)):
                    _put(out, part_name, np.ascontiguousarray(chunk))
    return out


def _put(out: dict, name: str, arr: np.ndarray) -> None:
    if name in out:
        raise ConversionError(f"reverse mapping sends two parameters to {name!r}")
    out[name] = arr
