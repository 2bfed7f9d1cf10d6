"""Real-size denoise step split over a mesh, simulated on fake CPU devices: per-device FLOPs and bytes.

    python benchmarks/parallel.py --model 1.3b                 # Wan2.1-1.3B 480x832x81, 8 and 16 devices
    python benchmarks/parallel.py --model 14b --devices 8      # Wan2.1-14B 720x1280x81
    python benchmarks/parallel.py --model tiny --devices 8     # seconds: a smoke run of this script
    python benchmarks/parallel.py --model stepvideo --devices 8 16 32   # StepVideo-T2V 30B 544x992x204
    python benchmarks/parallel.py --model stepvideo-tiny --devices 8    # seconds: the StepVideo path's smoke run

Nothing real is allocated: the DiT's parameters are ``jax.ShapeDtypeStruct``s carrying their shardings
(``nnx.eval_shape`` + the DIT rules), and the pipeline's jitted CFG denoise step (batch 2: cond + uncond,
the scheduler update included: Wan's UniPC, StepVideo's flow-match Euler) is lowered and compiled for each mesh.
StepVideo's step takes its two texts as the pipeline passes them: Step-LLM states (B, 320, 6144), BERT states
(B, 77, 1024) and the (B, 397) mask; its latents are the VAE's (64 channels, 16x spatial, 17 frames -> 3).
Mesh per row: ``sequence = sp``, ``data = 2`` (CFG parallel) while devices remain, ``fsdp`` = the rest. Rows
whose sp does not divide the heads are skipped.

How the numbers are counted:
- bytes/device: ``compiled.memory_analysis()`` of the whole step (all layers under one scan, the memory-safe
  blocked reference attention, bf16 weights): arguments (weights, latents, text, scheduler state) + temporaries.
- FLOPs/device: ``compiled.cost_analysis()`` counts a while-loop (scan) body once, whatever its trip count. So
  FLOPs = cost(the step with ONE layer) + (layers - 1) x cost(one block alone, same mesh and input
  shardings). Both are compiled with dense attention (the blocked reference attention is itself a scan, which
  would be undercounted the same way), so every attention FLOP is counted.
- "ideal" is the one-device step's FLOPs / devices; the ratio is FLOPs/device over ideal.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _set_device_count(n: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


@dataclasses.dataclass(frozen=True)
class Case:
    """A model and request: the DiT family and preset, the latents (B, C, F, H, W) of one request, the text tokens
    (Wan: UMT5; StepVideo: Step-LLM, with ``clip_len`` BERT tokens before them)."""

    family: str  # "wan" | "stepvideo"
    preset: str
    latent_shape: tuple[int, ...]
    text_len: int
    label: str
    clip_len: int = 0
    arch_overrides: tuple[tuple[str, object], ...] = ()


MODELS = {
    "1.3b": Case("wan", "wan2.1-t2v-1.3b", (1, 16, 21, 60, 104), 512, "480x832x81"),
    "14b": Case("wan", "wan2.1-t2v-14b", (1, 16, 21, 90, 160), 512, "720x1280x81"),
    "tiny": Case("wan", "tiny", (1, 16, 3, 16, 16), 16, "128x128x9"),
    # 204 frames = 12 chunks of 17 -> 36 latent frames; 544 / 16 = 34 rows, 992 / 16 = 62 columns (patch 1)
    "stepvideo": Case("stepvideo", "stepvideo-t2v", (1, 64, 36, 34, 62), 320, "544x992x204", clip_len=77),
    "stepvideo-tiny": Case("stepvideo", "tiny", (1, 8, 3, 4, 4), 16, "64x64x17", clip_len=8,
                           arch_overrides=(("num_attention_heads", 8), ("attention_head_dim", 16))),
}


def _family(case: Case):
    """(config class, model class, presets, the attribute holding the stacked blocks)."""
    if case.family == "wan":
        from fastvideo_jax.configs.models.dits.wanvideo import WAN_PRESETS, WanVideoConfig
        from fastvideo_jax.models.dits.wanvideo import WanTransformer3DModel

        return WanVideoConfig, WanTransformer3DModel, WAN_PRESETS, "blocks"
    from fastvideo_jax.configs.models.dits.stepvideo import STEPVIDEO_PRESETS, StepVideoConfig
    from fastvideo_jax.models.dits.stepvideo import StepVideoModel

    return StepVideoConfig, StepVideoModel, STEPVIDEO_PRESETS, "transformer_blocks"


def _arch(case: Case) -> dict:
    return {**_family(case)[2][case.preset], **dict(case.arch_overrides)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="1.3b")
    p.add_argument("--devices", type=int, nargs="+", default=[8, 16])
    p.add_argument("--sp", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--no-flops", action="store_true", help="memory only (skips the FLOP compiles)")
    args = p.parse_args(argv)
    _set_device_count(max(args.devices))
    run(args)
    return 0


def run(args) -> None:
    import jax

    from fastvideo_jax.pipelines.stages.validation import patch_of

    case = MODELS[args.model]
    arch, latent_shape, label = _arch(case), case.latent_shape, case.label
    heads, layers = arch["num_attention_heads"], arch["num_layers"]
    pt, ph, pw = patch_of(_family(case)[0]().update_model_arch(arch).arch_config)
    tokens = latent_shape[2] // pt * (latent_shape[3] // ph) * (latent_shape[4] // pw)
    text = f"{case.text_len} + {case.clip_len} text tokens, " if case.clip_len else ""
    name = {"wan": "Wan", "stepvideo": "StepVideo"}[case.family]
    print(f"{name} {args.model} {label}: {tokens} tokens, {text}{heads} heads, {layers} layers, CFG batch 2, bf16 "
          f"weights; jax {jax.__version__}")
    single = None if args.no_flops else step_flops(case, None)
    if single is not None:
        print(f"one device: {single / 1e12:.2f} TFLOP per step")
    print(f"{'devices':>7} {'mesh':<34} {'TFLOP/dev':>9} {'x ideal':>7} {'args GiB':>8} {'temp GiB':>8} "
          f"{'total GiB':>9} {'compile s':>9}")
    for n in args.devices:
        for sp in args.sp:
            if sp > n or n % sp:
                continue
            if heads % sp:
                print(f"{n:>7} sequence={sp:<25} skipped: {heads} heads do not divide by sp={sp}")
                continue
            mesh = _mesh(n, sp)
            t0 = time.perf_counter()
            mem = step_memory(case, mesh)
            flops = None if args.no_flops else step_flops(case, mesh)
            seconds = time.perf_counter() - t0
            args_gib, temp_gib = mem.argument_size_in_bytes / 2**30, mem.temp_size_in_bytes / 2**30
            shape = ",".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1)
            tflop = "-" if flops is None else f"{flops / 1e12:.3f}"
            ratio = "-" if flops is None else f"{flops / (single / n):.3f}"
            print(f"{n:>7} {shape:<34} {tflop:>9} {ratio:>7} {args_gib:>8.2f} {temp_gib:>8.2f} "
                  f"{args_gib + temp_gib:>9.2f} {seconds:>9.1f}", flush=True)
            _record(args.model, label, n, shape, flops, single, mem)


def _mesh(n: int, sp: int):
    from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh

    import jax

    data = 2 if n // sp >= 2 else 1
    return make_mesh(MeshConfig(data=data, fsdp=n // (sp * data), sequence=sp), jax.devices()[:n])


def _abstract_dit(case: Case, layers: int, mesh):
    """(graphdef, abstract state with shardings) of the bf16 DiT of ``case`` with ``layers`` layers."""
    import jax
    from flax import nnx

    from fastvideo_jax.models.loader.component_loader import build_abstract, state_shardings
    from fastvideo_jax.parallel.mesh import make_mesh
    from fastvideo_jax.parallel.rules import DIT_RULES
    from fastvideo_jax.utils.nnx_vars import var_value

    config_cls, model_cls, _, _ = _family(case)
    config = config_cls(precision="bf16", attention_backend="reference").update_model_arch(
        {**_arch(case), "num_layers": layers})
    graphdef, abstract = build_abstract(model_cls, config)
    shardings = state_shardings(abstract, DIT_RULES, mesh if mesh is not None else make_mesh())
    flat = [(p, v.replace(jax.ShapeDtypeStruct(var_value(v).shape, var_value(v).dtype, sharding=shardings[p])))
            for p, v in nnx.to_flat_state(abstract)]
    return graphdef, nnx.from_flat_state(flat)


def _scheduler(case: Case):
    """(scheduler, its 50-step tables) as the pipeline builds them."""
    from fastvideo_jax.pipelines.stages.timesteps import pad_tables

    if case.family == "wan":
        from fastvideo_jax.schedulers.flow_unipc import FlowUniPCMultistepScheduler
        from fastvideo_jax.testing.tiny_pipeline import UNIPC_FLOW_CONFIG

        scheduler = FlowUniPCMultistepScheduler.from_config(UNIPC_FLOW_CONFIG)
        return scheduler, pad_tables(scheduler.set_timesteps(50), 50)
    from fastvideo_jax.pipelines.stepvideo import stepvideo_tables
    from fastvideo_jax.schedulers.flow_match_euler import FlowMatchEulerScheduler

    scheduler = FlowMatchEulerScheduler(shift=13.0)
    return scheduler, pad_tables(stepvideo_tables(scheduler, 50), 50)


def _conditioning(case: Case, arch: dict) -> dict:
    """The DiT's text inputs for the CFG batch (bf16 states, as the text stage returns them)."""
    import jax
    import jax.numpy as jnp

    B = 2 * case.latent_shape[0]
    if case.family == "wan":
        return {"encoder_hidden_states": jax.ShapeDtypeStruct((B, case.text_len, arch["text_dim"]), jnp.bfloat16)}
    llm_dim, clip_dim = arch["caption_channels"]
    return {"encoder_hidden_states": jax.ShapeDtypeStruct((B, case.text_len, llm_dim), jnp.bfloat16),
            "encoder_hidden_states_2": jax.ShapeDtypeStruct((B, case.clip_len, clip_dim), jnp.bfloat16),
            "encoder_attention_mask": jax.ShapeDtypeStruct((B, case.clip_len + case.text_len), jnp.int32)}


def _step_inputs(case: Case, mesh):
    """Abstract (latents, scheduler state, tables, conditioning, guidance) placed as the pipeline places them."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from fastvideo_jax.parallel.activations import spec_for
    from fastvideo_jax.pipelines.stages.denoising import _state_axes

    latent_shape = case.latent_shape
    scheduler, tables = _scheduler(case)
    state = jax.eval_shape(lambda: scheduler.init_state(tables, latent_shape))
    tables = jax.eval_shape(lambda: tables)
    latents = jax.ShapeDtypeStruct(latent_shape, jnp.float32)
    guidance = jax.ShapeDtypeStruct((), jnp.float32)
    batch = latent_shape[0]

    def place(a, axes_batch):
        if mesh is None:
            return a
        axes = _state_axes(a, axes_batch) if axes_batch else (None,) * a.ndim
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec_for(axes, a.shape, mesh)))

    replicated = functools.partial(place, axes_batch=0)
    conditioning = {k: place(v, v.shape[0]) for k, v in _conditioning(case, _arch(case)).items()}
    return scheduler, (place(latents, batch), jax.tree.map(lambda a: place(a, batch), state),
                       jax.tree.map(replicated, tables), conditioning, None, replicated(guidance))


def _compile_step(case: Case, layers: int, mesh):
    import jax
    import jax.numpy as jnp

    from fastvideo_jax.parallel.activations import mesh_scope
    from fastvideo_jax.pipelines.stages.denoising import _denoise_step

    graphdef, state = _abstract_dit(case, layers, mesh)
    scheduler, inputs = _step_inputs(case, mesh)
    step = jax.jit(functools.partial(_denoise_step, graphdef, scheduler, True, jnp.bfloat16))
    with mesh_scope(mesh):
        return step.lower(state, *inputs).compile()


def step_memory(case: Case, mesh):
    return _compile_step(case, _arch(case)["num_layers"], mesh).memory_analysis()


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def step_flops(case: Case, mesh) -> float:
    """cost(step with one layer) + (layers - 1) x cost(one block), with dense attention (see the module doc)."""
    from fastvideo_jax.attention import reference

    saved = reference.DENSE_MAX_LOGITS
    reference.DENSE_MAX_LOGITS = 1 << 62  # dense logits: compiled only, never run; every FLOP visible
    try:
        one_layer = _flops(_compile_step(case, 1, mesh))
        block = _flops(_compile_block(case, mesh))
    finally:
        reference.DENSE_MAX_LOGITS = saved
    return one_layer + (_arch(case)["num_layers"] - 1) * block


def _compile_block(case: Case, mesh):
    """One transformer block on the step's (CFG batch 2) activations, laid out as inside the DiT."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fastvideo_jax.parallel.activations import constrain, mesh_scope
    from fastvideo_jax.parallel.sequence import pad_length, padding_mask
    from fastvideo_jax.pipelines.stages.validation import patch_of

    arch, latent_shape = _arch(case), case.latent_shape
    config_cls, _, _, blocks_attr = _family(case)
    graphdef, state = _abstract_dit(case, 1, mesh)
    B = 2 * latent_shape[0]
    pt, ph, pw = patch_of(config_cls().update_model_arch(arch).arch_config)
    grid = (latent_shape[2] // pt, latent_shape[3] // ph, latent_shape[4] // pw)
    L = grid[0] * grid[1] * grid[2]
    D = arch["num_attention_heads"] * arch["attention_head_dim"]
    text_len = case.text_len + case.clip_len
    cos, sin = _rope(case, arch, grid)

    def block_fn(state, x, context, temb_proj):
        model = nnx.merge(graphdef, state)
        block = nnx.merge(*nnx.split(getattr(model, blocks_attr)))
        block = jax.tree.map(lambda a: a[0], block)
        c, s = cos(), sin()
        Lp = pad_length(L)
        x, c, s = (jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, Lp - L), (0, 0)]) for a in (x, c, s))
        x = constrain(x, ("batch", "length", "embed"))
        c, s = constrain(c, ("length", None)), constrain(s, ("length", None))
        context = constrain(context, ("batch", "text_length", "embed"))
        temb_proj = constrain(temb_proj, ("batch", None, "embed"))
        if case.family == "wan":
            return block(x, context, None, temb_proj, c, s, kv_mask=padding_mask(B, L, Lp))
        text_mask = jnp.ones((B, text_len), bool)  # a prefix mask as the DiT builds it (all text here)
        return block(x, context, text_mask, temb_proj, c, s, padding_mask(B, L, Lp))

    x = jax.ShapeDtypeStruct((B, L, D), jnp.bfloat16)
    context = jax.ShapeDtypeStruct((B, text_len, D), jnp.bfloat16)
    temb_proj = jax.ShapeDtypeStruct((B, 6, D), jnp.float32)
    with mesh_scope(mesh):
        return jax.jit(block_fn).lower(state, x, context, temb_proj).compile()


def _rope(case: Case, arch: dict, grid):
    """Thunks (traced inside the block) for the (L, E/2) cos and sin tables the family's DiT builds."""
    from fastvideo_jax.models.layers.embeddings import rope_3d_tables

    E = arch["attention_head_dim"]
    if case.family == "wan":
        tables = functools.partial(rope_3d_tables, E, grid, arch.get("rope_max_seq_len", 1024))
    else:
        from fastvideo_jax.configs.models.dits.stepvideo import StepVideoConfig
        from fastvideo_jax.models.dits.stepvideo import ROPE_THETA

        axes = StepVideoConfig().update_model_arch(arch).arch_config.rope_axes_dim
        tables = functools.partial(rope_3d_tables, E, grid, max(grid), ROPE_THETA, axes)
    return (lambda: tables()[0]), (lambda: tables()[1])


def _record(model, label, n, shape, flops, single, mem) -> None:
    from _results import record

    record(f"parallel {model} {label}", f"{n} devices {shape}",
           tflop_per_device=None if flops is None else round(flops / 1e12, 4),
           x_ideal=None if flops is None else round(flops / (single / n), 4),
           argument_gib=round(mem.argument_size_in_bytes / 2**30, 3), temp_gib=round(mem.temp_size_in_bytes / 2**30, 3))


if __name__ == "__main__":
    raise SystemExit(main())
