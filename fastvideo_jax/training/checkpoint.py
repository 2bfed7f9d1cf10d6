"""Training checkpoints: orbax ``CheckpointManager`` over ``<output>/checkpoints/<step>``.

Each checkpoint holds two items: ``state`` (the ``TrainState``: step, fp32 master parameters, optimizer state,
RNG key data; arrays saved by every process from its own shards, restored straight onto the current mesh) and
``meta`` (JSON: the model's fingerprint, the data position and what the data position means: dataset size, batch
size, accumulation, seed). Saves are asynchronous (orbax writes in a background thread while training
continues; a checkpoint directory becomes visible only once complete, so a run killed mid-save resumes from the
previous one), every ``every`` steps, keeping the last ``keep``.

Resuming checks ``meta`` before any array is read: a checkpoint of another model (architecture, trainable
parameter names or shapes) or of another data layout is refused with a ``CheckpointError`` naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from fastvideo_jax.errors import CheckpointError

__all__ = ["TrainCheckpointer", "arch_fields", "model_fingerprint"]

log = logging.getLogger(__name__)

FORMAT = "fastvideo_jax.train/1"


def model_fingerprint(config: Any, params: dict[str, Any]) -> dict[str, Any]:
    """What identifies the model being trained: its class, architecture fields, and the trainable parameters'
    names, shapes (and a hash of the list, so a long list compares in one line)."""
    arch = getattr(config, "arch_config", None)
    fields = {} if arch is None else arch_fields(arch)
    shapes = {k: list(map(int, v.shape)) for k, v in sorted(params.items())}
    digest = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]
    return {"model": type(config).__name__ if config is not None else None, "arch": fields,
            "trainable": shapes, "trainable_digest": digest}


def arch_fields(arch: Any) -> dict[str, Any]:
    """An ArchConfig's config.json fields as JSON values (what a checkpoint records and compares)."""
    return json.loads(json.dumps({k: _jsonable(v) for k, v in arch.to_dict().items()}))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


class TrainCheckpointer:
    def __init__(self, directory: str | Path, *, every: int, keep: int, async_save: bool = True):
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint every {every} steps keeping {keep}: both must be >= 1")
        self.directory = Path(directory).expanduser().absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Start saving (asynchronously) when ``step`` is a multiple of ``every`` (or ``force``)."""
        meta = {"format": FORMAT, "step": int(step), **meta}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def read_meta(self, step: int) -> dict[str, Any]:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises several kinds for a folder it cannot read
            raise CheckpointError(f"{self.directory / str(step)}: not a readable training checkpoint ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{self.directory / str(step)}: not a fastvideo-jax training checkpoint "
                                  f"(format {None if not isinstance(meta, dict) else meta.get('format')!r})")
        return meta

    def check(self, step: int, expected: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's meta, after checking it was written for this model and data layout."""
        meta = self.read_meta(step)
        where = self.directory / str(step)
        ours, theirs = expected["fingerprint"], meta.get("fingerprint", {})
        if ours.get("model") != theirs.get("model") or ours.get("arch") != theirs.get("arch"):
            diff = sorted(k for k in set(ours.get("arch", {})) | set(theirs.get("arch", {}))
                          if ours.get("arch", {}).get(k) != theirs.get("arch", {}).get(k))
            detail = ", ".join(f"{k}: checkpoint {theirs.get('arch', {}).get(k)!r} vs model "
                               f"{ours.get('arch', {}).get(k)!r}" for k in diff[:4])
            raise CheckpointError(f"{where}: written for another model ({theirs.get('model')} vs "
                                  f"{ours.get('model')}; {detail or 'different class'}); use a new output directory")
        if ours.get("trainable_digest") != theirs.get("trainable_digest"):
            a, b = ours.get("trainable", {}), theirs.get("trainable", {})
            missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
            reshaped = sorted(k for k in set(a) & set(b) if a[k] != b[k])
            raise CheckpointError(f"{where}: its trainable parameters differ from this run's (not in the checkpoint: "
                                  f"{missing[:3]}, only in the checkpoint: {extra[:3]}, other shapes: {reshaped[:3]}); "
                                  f"use a new output directory")
        for key in ("dataset_size", "batch_size", "accum", "seed"):
            if meta.get("data", {}).get(key) != expected["data"].get(key):
                raise CheckpointError(f"{where}: written with {key}={meta.get('data', {}).get(key)!r}, this run has "
                                      f"{key}={expected['data'].get(key)!r}: the data position would not mean the "
                                      f"same samples; rerun with the same setting or a new output directory")
        return meta

    def restore(self, step: int, abstract_state: Any) -> Any:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self.manager.restore(step, args=args)["state"]

    def wait(self) -> None:
        """Block until a pending asynchronous save has been committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
