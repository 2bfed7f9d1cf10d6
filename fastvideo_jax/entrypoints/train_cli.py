"""``fastvideo-jax train``: finetune a Wan DiT with the flow-matching objective on a preprocessed dataset.

Running the same command again resumes from the newest checkpoint in ``--output-dir``.
"""

from __future__ import annotations

import argparse

from fastvideo_jax.training.objective import WEIGHTING_SCHEMES
from fastvideo_jax.training.optim import SCHEDULES


def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="finetune a Wan DiT on a preprocessed dataset (flow matching, AdamW, resumable)",
        description="Finetune the DiT of a Diffusers-format Wan pipeline on a dataset written by "
        "`fastvideo-jax preprocess`: FastVideo's flow-matching objective, AdamW on fp32 master weights, orbax "
        "checkpoints in OUTPUT_DIR/checkpoints (the same command resumes), metrics in OUTPUT_DIR/metrics.jsonl, "
        "the trained DiT exported to OUTPUT_DIR/transformer (Diffusers safetensors).")
    p.add_argument("--model", required=True, help="pipeline directory, Hugging Face repo id or tiny-wan")
    p.add_argument("--data", required=True, help="dataset directory written by `fastvideo-jax preprocess`")
    p.add_argument("--output-dir", required=True, help="checkpoints, metrics, validation videos, exported DiT")
    p.add_argument("--max-steps", type=int, required=True, help="optimizer steps in total (a resumed run counts on)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per micro-batch, over all devices")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches accumulated per optimizer step")
    p.add_argument("--seed", type=int, default=0, help="data order, noise and timesteps")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--lr-schedule", choices=SCHEDULES, default="constant")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine: final lr as a fraction of the peak")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--betas", default="0.9,0.999", help="AdamW beta1,beta2")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this global norm (0: off)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="DiT compute precision (master weights and optimizer state are fp32)")
    p.add_argument("--remat", choices=["none", "full", "dots"], default="full",
                   help="rematerialise each DiT block in the backward pass (full: least memory)")
    p.add_argument("--mesh", default=None, help="e.g. fsdp=8 or data=2,fsdp=4 (weights over fsdp, batch over data)")
    p.add_argument("--attention-backend", default=None, help="override the DiT's attention backend")
    p.add_argument("--flow-shift", type=float, default=1.0,
                   help="shift of the training sigmas (FastVideo's Wan finetune trains with 1.0)")
    p.add_argument("--weighting-scheme", choices=WEIGHTING_SCHEMES, default="uniform",
                   help="timestep density (FastVideo's default: uniform)")
    p.add_argument("--logit-mean", type=float, default=0.0)
    p.add_argument("--logit-std", type=float, default=1.0)
    p.add_argument("--mode-scale", type=float, default=1.29)
    p.add_argument("--cfg-rate", type=float, default=0.0, help="probability of training a sample without its text")
    p.add_argument("--checkpoint-every", type=int, default=100, help="save a checkpoint every N steps")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="keep the last K checkpoints")
    p.add_argument("--log-every", type=int, default=10, help="fetch metrics (loss, lr, steps/s) every N steps")
    p.add_argument("--validate-every", type=int, default=0, help="write validation videos every N steps (0: off)")
    p.add_argument("--validation-prompt", action="append", default=[], help="a validation prompt (repeatable)")
    p.add_argument("--validation-steps", type=int, default=None, help="denoising steps of validation videos")
    p.add_argument("--validation-size", default=None, help="HxWxF of validation videos, e.g. 480x832x33")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="train only LoRA adapters of this rank on the DiT's attention and FFN projections (base "
                   "frozen); exports <output-dir>/lora/pytorch_lora_weights.safetensors (generate --lora reads it)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (scale alpha / rank; default rank)")
    p.add_argument("--no-export", action="store_true", help="do not export the trained DiT (or LoRA) at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_train)


def config_from_args(args: argparse.Namespace):
    from fastvideo_jax.errors import UserError
    from fastvideo_jax.training.objective import FlowMatchObjective
    from fastvideo_jax.training.optim import OptimConfig
    from fastvideo_jax.training.run import TrainConfig

    try:
        betas = tuple(float(b) for b in args.betas.split(","))
    except ValueError:
        raise UserError(f"--betas {args.betas!r}: expected two numbers like 0.9,0.999") from None
    overrides = {"num_inference_steps": args.validation_steps}
    if args.validation_size:
        try:
            h, w, f = (int(v) for v in args.validation_size.lower().split("x"))
        except ValueError:
            raise UserError(f"--validation-size {args.validation_size!r}: expected HxWxF, e.g. 480x832x33") from None
        overrides.update(height=h, width=w, num_frames=f)
    objective = FlowMatchObjective(flow_shift=args.flow_shift, weighting_scheme=args.weighting_scheme,
                                   logit_mean=args.logit_mean, logit_std=args.logit_std, mode_scale=args.mode_scale,
                                   cfg_rate=args.cfg_rate)
    optim = OptimConfig(learning_rate=args.learning_rate, betas=betas, weight_decay=args.weight_decay,
                        max_grad_norm=args.max_grad_norm, schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
                        total_steps=max(args.max_steps, 1), min_lr_ratio=args.min_lr_ratio)
    return TrainConfig(model=args.model, data=args.data, output_dir=args.output_dir, max_steps=args.max_steps,
                       batch_size=args.batch_size, accum=args.grad_accum, seed=args.seed, precision=args.precision,
                       remat=args.remat, mesh=args.mesh, attention_backend=args.attention_backend,
                       objective=objective, optim=optim, checkpoint_every=args.checkpoint_every,
                       keep_checkpoints=args.keep_checkpoints, log_every=args.log_every,
                       validate_every=args.validate_every, validation_prompts=tuple(args.validation_prompt),
                       validation_overrides=overrides, export=not args.no_export, progress=not args.no_progress,
                       lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)


def run_train(args: argparse.Namespace, on_step=None) -> int:
    from fastvideo_jax.parallel.distributed import initialize_from_env
    from fastvideo_jax.training.run import train

    initialize_from_env()
    config = config_from_args(args)
    config.check()
    result = train(config, on_step=on_step)
    last = result["metrics"]
    loss = f", loss {last['loss']:.4f}" if last else ""
    print(f"trained to step {result['step']}{loss}; output in {result['output_dir']}"
          + (f"; DiT exported to {result['transformer']}" if "transformer" in result else "")
          + (f"; LoRA written to {result['lora']}" if "lora" in result else ""))
    return 0
