"""A whole training run: ``train(TrainConfig(...))`` and ``fastvideo-jax train``.

Order of work: the numbers, the output directory, the dataset (opened, non-empty, large enough), the model's
configs and the dataset's shapes against the DiT, the mesh, an existing checkpoint's meta (another model is
refused) -- all before a weight is read. Then the DiT is loaded once (at ``precision``; fp32 masters are the
trainer's), the state is restored or initialised, and steps run until ``max_steps``::

    <output_dir>/checkpoints/<step>/   orbax checkpoints (every ``checkpoint_every`` steps, the last ``keep``)
    <output_dir>/metrics.jsonl         one line per step: step, loss, grad_norm, lr, steps_per_s
    <output_dir>/validation/           step<N>_<i>.mp4 every ``validate_every`` steps (the existing pipeline)
    <output_dir>/transformer/          the trained DiT as a Diffusers folder (config.json + safetensors)

Running the same command again resumes from the newest checkpoint (metrics past it are dropped, then rewritten
by the resumed steps: a SIGKILLed run restarted gives the same losses, bit for bit, as one never stopped).
"""

from __future__ import annotations

import dataclasses
import json
import math
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from fastvideo_jax.errors import CheckpointError, OutputPathError, UserError
from fastvideo_jax.training.objective import FlowMatchObjective
from fastvideo_jax.training.optim import OptimConfig

__all__ = ["TrainConfig", "train"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str  # pipeline directory, Hugging Face repo id or tiny-wan
    data: str  # a dataset written by `fastvideo-jax preprocess`
    output_dir: str
    max_steps: int
    batch_size: int = 1  # samples per micro-batch (global)
    accum: int = 1  # micro-batches per optimizer step
    seed: int = 0
    precision: str = "bf16"  # the DiT's compute precision; masters and optimizer state are fp32
    remat: str = "full"
    mesh: str | None = None
    attention_backend: str | None = None
    objective: FlowMatchObjective = FlowMatchObjective()
    optim: OptimConfig = OptimConfig()
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    validate_every: int = 0
    validation_prompts: tuple[str, ...] = ()
    validation_overrides: dict = dataclasses.field(default_factory=dict)  # SamplingParam fields
    export: bool = True
    progress: bool = True
    lora_rank: int = 0  # > 0: train only LoRA adapters of this rank (models/layers/lora.py); the base stays frozen
    lora_alpha: float | None = None  # LoRA scale alpha / rank (default alpha = rank)

    def check(self) -> None:
        for name in ("max_steps", "batch_size", "accum", "checkpoint_every", "keep_checkpoints", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if self.precision not in ("bf16", "fp32"):
            raise UserError(f"precision {self.precision!r}: choose bf16 or fp32")
        if self.remat not in ("none", "full", "dots"):
            raise UserError(f"remat {self.remat!r}: choose none, full or dots")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise UserError(f"lora_rank must be a non-negative integer (0: full finetune), got {self.lora_rank!r}")
        if self.lora_alpha is not None and (not self.lora_rank or not math.isfinite(self.lora_alpha)
                                            or self.lora_alpha <= 0):
            raise UserError(f"lora_alpha must be a finite number > 0 and needs lora_rank > 0, got {self.lora_alpha!r}")
        if self.validate_every < 0 or (self.validate_every and not self.validation_prompts):
            raise UserError("validate_every > 0 needs at least one validation prompt (--validation-prompt)")


def train(config: TrainConfig, *, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns the final step, the last metrics and the paths written.
    ``on_step(step, metrics)`` is called after each step's metrics are on the host."""
    from fastvideo_jax.entrypoints.model_spec import ModelSpec
    from fastvideo_jax.parallel.spec import resolve_mesh
    from fastvideo_jax.training.data import LatentDataset

    config.check()
    optim = dataclasses.replace(config.optim, total_steps=config.max_steps)
    out = _output_path(config.output_dir)
    dataset = LatentDataset(config.data)  # UserError: missing, not a dataset, empty
    global_batch = config.batch_size * config.accum
    if len(dataset) < global_batch:
        raise UserError(f"{config.data}: {len(dataset)} sample(s), fewer than batch size x accumulation = "
                        f"{global_batch}")
    spec = ModelSpec.open(config.model)
    _check_data_fits(dataset, spec.dit_arch, config.data)
    mesh = resolve_mesh(config.mesh, num_heads=spec.dit_arch.num_attention_heads, use_cfg=False)
    if config.validate_every:
        from fastvideo_jax.training.validation import check_requests

        check_requests(spec, config.validation_prompts, config.validation_overrides, config.seed)
    from fastvideo_jax.training.checkpoint import TrainCheckpointer

    data_meta = {"dataset_size": len(dataset), "batch_size": config.batch_size, "accum": config.accum,
                 "seed": config.seed}
    resume = None
    if (out / "checkpoints").is_dir():  # another model's checkpoint is refused before any weight is read
        checkpointer = TrainCheckpointer(out / "checkpoints", every=config.checkpoint_every,
                                         keep=config.keep_checkpoints)
        resume = checkpointer.latest_step()
        if resume is not None:
            _precheck_arch(checkpointer, resume, spec)
    _make_dir(out)
    checkpointer = TrainCheckpointer(out / "checkpoints", every=config.checkpoint_every, keep=config.keep_checkpoints)

    from fastvideo_jax.models.loader.component_loader import TransformerLoader
    from fastvideo_jax.training.checkpoint import model_fingerprint
    from fastvideo_jax.training.trainer import Trainer

    overrides = {"precision": config.precision, "remat": config.remat}
    if config.attention_backend:
        overrides["attention_backend"] = config.attention_backend
    model = TransformerLoader().load(spec.path / "transformer", mesh=mesh, **overrides)
    trainable = _maybe_lora(model, config)
    # LatentDataset gives the latents the DiT sees (normalised with the VAE's latents_mean/std)
    trainer = Trainer(model, config.objective, optim, mesh=mesh, accum=config.accum, trainable=trainable)
    del model
    expected = {"fingerprint": model_fingerprint(trainer.split.config, trainer.abstract_state().params),
                "data": data_meta}
    if resume is not None:
        checkpointer.check(resume, expected)
        state = checkpointer.restore(resume, trainer.abstract_state())
        log.info("resumed from %s at step %d", checkpointer.directory / str(resume), resume)
    else:
        state = trainer.init_state(config.seed)
    metrics = _Metrics(out / "metrics.jsonl", int(state.step))
    loop = _Loop(config, trainer, checkpointer, expected, metrics, spec, mesh, out, on_step)
    try:
        state, last = loop.run(state, dataset)
    finally:
        checkpointer.close()
    result = {"step": int(state.step), "metrics": last, "output_dir": str(out)}
    if config.export and config.lora_rank:
        from fastvideo_jax.training.export import export_lora

        result["lora"] = str(export_lora(trainer, state, out / "lora"))
    elif config.export:
        from fastvideo_jax.training.export import export_dit

        result["transformer"] = str(export_dit(trainer, state, spec.path / "transformer", out / "transformer"))
    return result


def _maybe_lora(model, config: TrainConfig):
    """The trainable filter: every parameter, or (``lora_rank`` > 0) fresh LoRA adapters on the DiT's
    ``lora_target_modules``, initialised from the run's seed."""
    from flax import nnx

    if not config.lora_rank:
        return nnx.Param
    from fastvideo_jax.models.layers.lora import LORA_FILTER, inject_lora

    layers = inject_lora(model, config.lora_rank, config.lora_alpha, rngs=nnx.Rngs(config.seed))
    log.info("LoRA rank %d on %d layers (%s, ...)", config.lora_rank, len(layers), ", ".join(layers[:3]))
    return LORA_FILTER


class _Loop:
    def __init__(self, config, trainer, checkpointer, expected, metrics, spec, mesh, out, on_step):
        self.config, self.trainer, self.checkpointer, self.expected = config, trainer, checkpointer, expected
        self.metrics, self.spec, self.mesh, self.out, self.on_step = metrics, spec, mesh, out, on_step
        self._validator = None

    def run(self, state, dataset):
        from tqdm import tqdm

        from fastvideo_jax.training.data import batch_iterator

        c = self.config
        start = int(state.step)
        bar = tqdm(total=c.max_steps, initial=start, desc="train", disable=not c.progress or not _primary())
        pending, last, tick = [], {}, time.perf_counter()
        if start >= c.max_steps:
            return state, last
        batches = batch_iterator(dataset, c.batch_size * c.accum, c.seed, start, process_index=jax.process_index(),
                                 process_count=jax.process_count())
        for data_step, batch in batches:
            state, m = self.trainer.step(state, self.trainer.place_batch(batch))
            step = data_step + 1
            pending.append((step, m))
            saving = step % c.checkpoint_every == 0 or step == c.max_steps
            if len(pending) >= c.log_every or saving or step == c.max_steps or self.on_step is not None:
                now = time.perf_counter()
                rate = len(pending) / max(now - tick, 1e-9)
                tick = now
                for s, values in jax.device_get(pending):
                    last = {"step": s, **{k: float(v) for k, v in values.items()}, "steps_per_s": rate}
                    self.metrics.write(last)
                    if self.on_step is not None:
                        self.on_step(s, last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", steps_s=f"{rate:.2f}")
                bar.update(len(pending))
                pending = []
            if saving:
                self.checkpointer.save(step, state, {**self.expected, "data": {**self.expected["data"],
                                                                                "next_step": step}},
                                       force=step == c.max_steps)
            if c.validate_every and step % c.validate_every == 0:
                self.validate(state, step)
            if step >= c.max_steps:
                break
        bar.close()
        return state, last

    def validate(self, state, step: int) -> None:
        from fastvideo_jax.training.validation import Validator

        if self._validator is None:
            self._validator = Validator(self.spec, self.mesh, self.out / "validation", self.config.validation_prompts,
                                        self.config.validation_overrides, self.config.seed)
        self._validator(self.trainer.model(state), step)


class _Metrics:
    """metrics.jsonl: on resume at step k, lines past k (written before a crash) are dropped first."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if _line_step(line) <= resume_step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)

    def write(self, record: dict) -> None:
        if _primary():
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line: dropped


def _primary() -> bool:
    return jax.process_index() == 0


def _output_path(path: str) -> Path:
    out = Path(path).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"output directory {out} exists and is not a directory")
    return out


def _make_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot create output directory {out}: {e.strerror or e}") from None
    return out


def _check_data_fits(dataset, arch, where: str) -> None:
    """The dataset's latents and text embeddings against the DiT (text-to-video Wan), before any weight."""
    sample = dataset[0]
    C, F, H, W = sample["latents"].shape
    E = sample["prompt_embeds"].shape[-1]
    if getattr(arch, "image_dim", None) is not None or arch.in_channels != arch.out_channels:
        raise UserError("training supports text-to-video DiTs only (this one takes image conditioning: "
                        f"in_channels {arch.in_channels}, image_dim {getattr(arch, 'image_dim', None)})")
    if C != arch.in_channels:
        raise UserError(f"{where}: latents have {C} channels, the DiT takes {arch.in_channels} (another VAE?)")
    if E != arch.text_dim:
        raise UserError(f"{where}: text embeddings are {E}-dimensional, the DiT takes {arch.text_dim} "
                        "(another text encoder?)")
    pt, ph, pw = arch.patch_size
    if F % pt or H % ph or W % pw:
        raise UserError(f"{where}: latent grid {(F, H, W)} is not divisible by the DiT's patch {arch.patch_size}")


def _precheck_arch(checkpointer, step: int, spec) -> None:
    """Compare the checkpoint's architecture with the model's configs (no weights read yet)."""
    meta = checkpointer.read_meta(step)
    from fastvideo_jax.training.checkpoint import arch_fields

    theirs = meta.get("fingerprint", {}).get("arch", {})
    ours = arch_fields(spec.dit_arch)
    diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if diff:
        detail = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs model {ours.get(k)!r}" for k in diff[:4])
        raise CheckpointError(f"{checkpointer.directory / str(step)}: written for another model ({detail}); "
                              f"use a new output directory or the model it was trained from")
