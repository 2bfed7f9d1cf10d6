"""Training-step cost: tiny step time + memory on this machine; the real-size step's per-device memory, AOT.

    python benchmarks/train_step.py --model tiny                    # run: step time (best of N), memory
    python benchmarks/train_step.py --model 1.3b --batch 1          # run on an accelerator (remat full by
                                                                     # default; a policy that does not fit is
                                                                     # reported, the next one still runs)
    python benchmarks/train_step.py --model 1.3b --aot              # Wan2.1-1.3B 480x832x81 finetune step,
                                                                     # lowered on fake 8-device meshes
    python benchmarks/train_step.py --model tiny --aot              # seconds: a smoke run of the AOT path
    python benchmarks/train_step.py --model 1.3b --aot --lora-rank 32   # LoRA: adapters trained, base frozen

The step is ``Trainer``'s jitted step: flow-matching loss on the DiT at bf16 compute (fp32 masters and AdamW
moments), gradient clipping, one optax update, the state donated. ``--aot``: nothing is allocated; the DiT's
parameters are ``jax.ShapeDtypeStruct``s carrying their FSDP shardings (``nnx.eval_shape`` + ``DIT_RULES``),
the state and batch likewise, and the step is lowered and compiled for each mesh and remat policy:
bytes/device = ``compiled.memory_analysis()`` arguments (masters, moments, bf16 weights, batch) + temporaries
(activations kept for the backward, gradients, workspaces). Meshes: fsdp=8 (batch 8, one sample per device)
and data=2 x fsdp=4 (batch 8). ``--lora-rank R``: rank-R adapters (``inject_lora``, the kernels' bf16, alpha =
rank) on the DiT's LoRA targets, as ``fastvideo-jax train --lora-rank`` makes them; only they are in the state,
the bf16 base is the step's frozen (not donated) argument.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {
    # preset, latent (C, F, H, W) of one sample, text tokens, label
    "1.3b": ("wan2.1-t2v-1.3b", (16, 21, 60, 104), 512, "480x832x81"),
    "14b": ("wan2.1-t2v-14b", (16, 21, 90, 160), 512, "720x1280x81"),
    "tiny": ("tiny", (16, 3, 16, 16), 16, "128x128x9"),
}
MESHES = {"fsdp=8": dict(fsdp=8), "data=2,fsdp=4": dict(data=2, fsdp=4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--aot", action="store_true", help="lower on fake 8-device meshes (no allocation)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: 8 with --aot, 2 otherwise)")
    p.add_argument("--remat", nargs="+", default=None,
                   help="policies (default: none full dots; a real-size run on an accelerator: full)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (run mode)")
    p.add_argument("--lora-rank", type=int, default=0, help="train rank-R LoRA adapters only (0: full finetune)")
    args = p.parse_args(argv)
    if args.remat is None:
        args.remat = ["full"] if args.model != "tiny" and not args.aot else ["none", "full", "dots"]
    if args.aot:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
        aot(args)
    else:
        run(args)
    return 0


def _abstract_trainer(preset: str, remat: str, mesh, precision: str = "bf16", lora_rank: int = 0):
    """A Trainer over an abstract bf16 DiT whose parameters carry their shardings on ``mesh``."""
    import jax
    from flax import nnx

    from fastvideo_jax.configs.models.dits.wanvideo import WAN_PRESETS, WanVideoConfig
    from fastvideo_jax.models.dits.wanvideo import WanTransformer3DModel
    from fastvideo_jax.models.loader.component_loader import build_abstract, state_shardings
    from fastvideo_jax.parallel.rules import DIT_RULES
    from fastvideo_jax.training.objective import FlowMatchObjective
    from fastvideo_jax.training.optim import OptimConfig
    from fastvideo_jax.training.trainer import Trainer
    from fastvideo_jax.utils.nnx_vars import var_value

    config = WanVideoConfig(precision=precision, attention_backend="reference", remat=remat).update_model_arch(
        dict(WAN_PRESETS[preset]))
    graphdef, abstract = build_abstract(WanTransformer3DModel, config)
    shardings = state_shardings(abstract, DIT_RULES, mesh)
    flat = [(p, v.replace(jax.ShapeDtypeStruct(var_value(v).shape, var_value(v).dtype, sharding=shardings[p])))
            for p, v in nnx.to_flat_state(abstract)]
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    return Trainer(model, FlowMatchObjective(), OptimConfig(), mesh=mesh, trainable=_lora(model, lora_rank))


def _lora(model, rank: int):
    """The trainable filter: every parameter, or (rank > 0) fresh adapters (small real arrays, sharded like
    their kernels) on the abstract model."""
    from flax import nnx

    if not rank:
        return nnx.Param
    from fastvideo_jax.models.layers.lora import LORA_FILTER, inject_lora

    inject_lora(model, rank, rngs=nnx.Rngs(0))
    return LORA_FILTER


def _abstract_batch(trainer, batch: int, latent, text_len: int, text_dim: int):
    import jax
    import numpy as np

    host = {"latents": np.zeros((batch, *latent), np.float32),
            "prompt_embeds": np.zeros((batch, text_len, text_dim), np.float32)}
    shapes = {k: jax.ShapeDtypeStruct((1, *v.shape), v.dtype) for k, v in host.items()}
    from jax.sharding import NamedSharding, PartitionSpec

    from fastvideo_jax.parallel.activations import spec_for

    out = {}
    for k, s in shapes.items():
        spec = spec_for(("batch",) + (None,) * (len(s.shape) - 2), s.shape[1:], trainer.mesh)
        sharding = NamedSharding(trainer.mesh, PartitionSpec(None, *spec))
        out[k] = jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
    return out


def aot(args) -> None:
    import jax

    from fastvideo_jax.configs.models.dits.wanvideo import WAN_PRESETS
    from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh

    preset, latent, text_len, label = MODELS[args.model]
    batch = args.batch or 8
    text_dim = WAN_PRESETS[preset]["text_dim"]
    lora = f", LoRA rank {args.lora_rank} (base frozen)" if args.lora_rank else ""
    print(f"Wan {args.model} {label} finetune step, batch {batch}, bf16 compute / fp32 masters + AdamW{lora}; "
          f"jax {jax.__version__}")
    print(f"{'mesh':<16} {'remat':<6} {'args GiB':>9} {'temp GiB':>9} {'total GiB':>9} {'compile s':>9}")
    for name, sizes in MESHES.items():
        mesh = make_mesh(MeshConfig(**sizes))
        for remat in args.remat:
            t0 = time.perf_counter()
            trainer = _abstract_trainer(preset, remat, mesh, lora_rank=args.lora_rank)
            state = trainer.abstract_state()
            inputs = _abstract_batch(trainer, batch, latent, text_len, text_dim)
            mem = trainer.lower(state, inputs).compile().memory_analysis()
            seconds = time.perf_counter() - t0
            a, t = mem.argument_size_in_bytes / 2**30, mem.temp_size_in_bytes / 2**30
            print(f"{name:<16} {remat:<6} {a:>9.2f} {t:>9.2f} {a + t:>9.2f} {seconds:>9.1f}", flush=True)
            case = f"{name} remat={remat} batch={batch}" + (f" lora={args.lora_rank}" if args.lora_rank else "")
            _record(f"train_step aot {args.model} {label}", case,
                    argument_gib=round(a, 3), temp_gib=round(t, 3))


def run(args) -> None:
    """The step run for real on the default device (real sizes: an accelerator): compile time, best step time,
    compiled memory."""
    import jax
    import numpy as np

    from fastvideo_jax.configs.models.dits.wanvideo import WAN_PRESETS

    preset, latent, text_len, label = MODELS[args.model]
    if args.model != "tiny" and jax.default_backend() == "cpu":
        raise SystemExit("run mode at real size needs an accelerator; on a CPU use --model tiny, or --aot")
    batch = args.batch or 2
    text_dim = WAN_PRESETS[preset]["text_dim"]
    rng = np.random.default_rng(0)
    host = {"latents": rng.standard_normal((batch, *latent)).astype(np.float32),
            "prompt_embeds": rng.standard_normal((batch, text_len, text_dim)).astype(np.float32)}
    print(f"Wan {args.model} {label} train step, batch {batch}, on {jax.devices()[0].platform}; "
          f"jax {jax.__version__}")
    for remat in args.remat:
        try:
            _run_policy(args, preset, label, remat, batch, host)
        except Exception as e:  # an out-of-memory policy is a result; the next one still runs
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            print(f"remat={remat:<5} does not fit: {str(e).splitlines()[0][:200]}", flush=True)


def _run_policy(args, preset, label, remat, batch, host) -> None:
    import jax

    trainer = _real_trainer(preset, remat)
    state = trainer.init_state(0)
    inputs = trainer.place_batch(host)
    t0 = time.perf_counter()
    compiled = trainer.lower(state, inputs).compile()
    first = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    frozen = trainer.split.frozen
    state, m = compiled(state, frozen, inputs)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, frozen, inputs)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    best = min(times)
    mib = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**20
    print(f"remat={remat:<5} compile {first:6.2f} s, best step {best * 1e3:8.2f} ms, "
          f"{1 / best:7.1f} steps/s, memory/device {mib:7.2f} MiB", flush=True)
    _record(f"train_step {args.model} {label}", f"remat={remat} batch={batch}", step_ms=round(best * 1e3, 3),
            compile_s=round(first, 2), memory_mib=round(mib, 3))


def _real_trainer(preset: str, remat: str):
    from flax import nnx

    from fastvideo_jax.configs.models.dits.wanvideo import WAN_PRESETS, WanVideoConfig
    from fastvideo_jax.models.dits.wanvideo import WanTransformer3DModel
    from fastvideo_jax.training.objective import FlowMatchObjective
    from fastvideo_jax.training.optim import OptimConfig
    from fastvideo_jax.training.trainer import Trainer

    config = WanVideoConfig(precision="bf16", remat=remat).update_model_arch(dict(WAN_PRESETS[preset]))
    with nnx.use_eager_sharding(False):
        model = WanTransformer3DModel(config, rngs=nnx.Rngs(0))
    return Trainer(model, FlowMatchObjective(), OptimConfig())


def _record(benchmark, case, **fields) -> None:
    from _results import record

    record(benchmark, case, **fields)


if __name__ == "__main__":
    raise SystemExit(main())
