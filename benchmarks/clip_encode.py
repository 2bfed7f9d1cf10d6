"""CLIP encoders: ours (JAX) vs Transformers (PyTorch) on the same random weights, in one run.

    python benchmarks/clip_encode.py --preset tiny-vision              # CPU smoke run
    python benchmarks/clip_encode.py --preset vit-h-14                 # one GPU: Wan2.1 I2V's image encoder
    python benchmarks/clip_encode.py --preset clip-vit-large-text      # one GPU: HunyuanVideo's text_encoder_2

Builds a random Transformers model of the preset (``CLIPVisionModelWithProjection`` / ``CLIPTextModel``), saves
it with save_pretrained, loads it through our loader, runs both on the same inputs and prints per-call times,
our compile time, peak device memory and the max-abs difference of what the pipelines use: the penultimate
hidden state (vision, as Wan I2V) or the pooled output (text, as HunyuanVideo).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _encoders import gib, time_jax, time_torch, torch_device  # noqa: E402

# preset -> (kind, our preset name, batch)
PRESETS = {
    "tiny-vision": ("vision", "tiny", 2),
    "tiny-text": ("text", "tiny", 2),
    "vit-h-14": ("vision", "vit-h-14", 1),  # one conditioning image per video
    "clip-vit-large-text": ("text", "clip-vit-large-patch14", 2),  # prompt + negative prompt
}


def _inputs(kind: str, arch: dict, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if kind == "vision":
        size = arch["image_size"]
        return {"pixel_values": rng.standard_normal((batch, 3, size, size), dtype=np.float32)}
    length = arch["max_position_embeddings"]
    ids = rng.integers(0, arch["vocab_size"], (batch, length))
    valid = np.linspace(length, length // 3, batch).astype(int)
    ids[np.arange(batch), valid - 1] = arch["eos_token_id"] if arch.get("eos_token_id", 2) != 2 else arch["vocab_size"] - 1
    mask = (np.arange(length)[None] < valid[:, None]).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


def _used(kind: str, hidden, pooled):
    return hidden[-2] if kind == "vision" else pooled


def run_torch(model_dir, cls_name, kind, dtype_name, inputs, iters):
    import torch
    import transformers

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    model = getattr(transformers, cls_name).from_pretrained(model_dir, dtype=dtype).to(torch_device()).eval()
    feeds = {k: torch.from_numpy(v).to(torch_device()) for k, v in inputs.items()}
    if "pixel_values" in feeds:
        feeds["pixel_values"] = feeds["pixel_values"].to(dtype)

    def pick(out):
        return _used(kind, out.hidden_states, getattr(out, "image_embeds", None) if kind == "vision"
                     else out.pooler_output)

    return time_torch(model, feeds, pick, iters)


def run_jax(model_dir, kind, dtype_name, inputs, iters):
    import jax.numpy as jnp

    from fastvideo_jax.models.loader.component_loader import ImageEncoderLoader, TextEncoderLoader

    loader = ImageEncoderLoader if kind == "vision" else TextEncoderLoader
    model = loader().load(model_dir, precision=dtype_name)
    act = jnp.bfloat16 if dtype_name == "bf16" else jnp.float32
    args = tuple(jnp.asarray(v, act if k == "pixel_values" else None) for k, v in inputs.items())

    def call():
        out = model(*args, output_hidden_states=True)
        return _used(kind, out.hidden_states, out.pooler_output)

    return time_jax(call, iters)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-vision", choices=sorted(PRESETS))
    p.add_argument("--dtype", default="fp32", choices=["bf16", "fp32"])
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)

    import jax
    import torch
    import transformers

    from fastvideo_jax.configs.models.encoders.clip import CLIP_TEXT_PRESETS, CLIP_VISION_PRESETS

    kind, name, batch = PRESETS[args.preset]
    arch = dict((CLIP_VISION_PRESETS if kind == "vision" else CLIP_TEXT_PRESETS)[name])
    cls_name = "CLIPVisionModelWithProjection" if kind == "vision" else "CLIPTextModel"
    config_cls = transformers.CLIPVisionConfig if kind == "vision" else transformers.CLIPTextConfig
    inputs = _inputs(kind, arch, batch)
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        ref = getattr(transformers, cls_name)(config_cls(**arch))
        n_params = sum(p.numel() for p in ref.parameters())
        ref.to({"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]).save_pretrained(d)
        del ref
        shapes = {k: v.shape for k, v in inputs.items()}
        print(f"preset {args.preset}: {n_params / 1e6:.1f} M params, inputs {shapes}, {args.dtype}, "
              f"device {jax.devices()[0].device_kind}")
        tj, compile_s, peak_j, out_j = run_jax(d, kind, args.dtype, inputs, args.iters)
        tt, peak_t, out_t = run_torch(d, cls_name, kind, args.dtype, inputs, args.iters)
    print(f"ours (jax)          : {tj * 1e3:9.2f} ms/call, compile {compile_s:.1f} s, peak {gib(peak_j)}")
    print(f"transformers eager  : {tt * 1e3:9.2f} ms/call, peak {gib(peak_t)}  -> speedup {tt / tj:.2f}x")
    what = "hidden_states[-2]" if kind == "vision" else "pooler_output"
    err = float(np.abs(out_j - out_t).max())
    print(f"max |ours - transformers| on {what} = {err:.3e} (max |ref| {np.abs(out_t).max():.2f})")
    from _results import record

    record(f"CLIP {kind} encode {args.preset} ({args.dtype}, {shapes})", "transformers eager", ours_ms=tj * 1e3,
           peer_ms=tt * 1e3, speedup=tt / tj, ours_compile_s=compile_s,
           ours_peak_gib=None if peak_j is None else peak_j / 2**30,
           peer_peak_gib=None if peak_t is None else peak_t / 2**30, max_abs_diff=err)


if __name__ == "__main__":
    main()
