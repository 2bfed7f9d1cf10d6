"""LLaMA text encoder (HunyuanVideo's text_encoder): ours (JAX) vs Transformers (PyTorch) on the same random
weights, in one run.

    python benchmarks/llama_encode.py --preset tiny                     # CPU smoke run
    python benchmarks/llama_encode.py --preset llava-llama-3-8b         # one GPU: HunyuanVideo's encoder, fp16

Builds a random Transformers ``LlamaModel`` of the preset (on the GPU when there is one), saves it with
save_pretrained, loads it through our loader, runs both on the same right-padded batch of HunyuanVideo's length
(256 prompt tokens + the template's 95) and prints per-call times, our compile time, peak device memory and the
max-abs difference of what the pipeline uses: the hidden state two layers before the last (``hidden_states[-3]``),
on the valid tokens.
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

# preset -> (our preset name, batch, tokens)
PRESETS = {
    "tiny": ("tiny", 2, 40),
    "llava-llama-3-8b": ("llava-llama-3-8b", 1, 256 + 95),  # embedded guidance: one prompt, no negative
}
SKIP = 2  # HunyuanVideo's hidden_state_skip_layer


def _inputs(arch: dict, batch: int, length: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, arch["vocab_size"], (batch, length))
    valid = np.linspace(length, length // 3, batch).astype(int)
    mask = (np.arange(length)[None] < valid[:, None]).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


def run_torch(model_dir, dtype_name, inputs, iters):
    import torch
    import transformers

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    model = transformers.LlamaModel.from_pretrained(model_dir, dtype=dtype).to(torch_device()).eval()
    feeds = {k: torch.from_numpy(v).to(torch_device()) for k, v in inputs.items()}
    return time_torch(model, feeds, lambda out: out.hidden_states[-(SKIP + 1)], iters)


def run_jax(model_dir, dtype_name, inputs, iters):
    import jax.numpy as jnp

    from fastvideo_jax.models.loader.component_loader import TextEncoderLoader

    model = TextEncoderLoader().load(model_dir, precision=dtype_name)
    args = tuple(jnp.asarray(v) for v in inputs.values())
    return time_jax(lambda: model(*args, output_hidden_states=True).hidden_states[-(SKIP + 1)], iters)


def _write_random(directory: str, arch: dict, dtype_name: str) -> int:
    import torch
    import transformers

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    dev = torch_device()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the 8B model in its dtype (half the host/GPU memory of fp32)
    try:
        with torch.device(dev):
            ref = transformers.LlamaModel(transformers.LlamaConfig(**arch))
    finally:
        torch.set_default_dtype(previous)
    n_params = sum(p.numel() for p in ref.parameters())
    ref.save_pretrained(directory)
    del ref
    return n_params


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"],
                   help="default: fp32 for tiny, fp16 (as shipped) for the real size")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)

    import jax

    from fastvideo_jax.configs.models.encoders.llama import LLAMA_PRESETS

    name, batch, length = PRESETS[args.preset]
    dtype = args.dtype or ("fp32" if name == "tiny" else "fp16")
    arch = {k: v for k, v in LLAMA_PRESETS[name].items() if k != "architectures"}
    inputs = _inputs(arch, batch, length)
    with tempfile.TemporaryDirectory() as d:
        n_params = _write_random(d, arch, dtype)
        shapes = {k: v.shape for k, v in inputs.items()}
        print(f"preset {args.preset}: {n_params / 1e9:.3f} B params, inputs {shapes}, {dtype}, "
              f"device {jax.devices()[0].device_kind}")
        tj, compile_s, peak_j, out_j = run_jax(d, dtype, inputs, args.iters)
        tt, peak_t, out_t = run_torch(d, dtype, inputs, args.iters)
    print(f"ours (jax)          : {tj * 1e3:9.2f} ms/call, compile {compile_s:.1f} s, peak {gib(peak_j)}")
    print(f"transformers eager  : {tt * 1e3:9.2f} ms/call, peak {gib(peak_t)}  -> speedup {tt / tj:.2f}x")
    valid = inputs["attention_mask"] > 0
    err = float(np.abs(out_j[valid] - out_t[valid]).max())
    print(f"max |ours - transformers| on hidden_states[-{SKIP + 1}] (valid tokens) = {err:.3e} "
          f"(max |ref| {np.abs(out_t[valid]).max():.2f})")
    from _results import record

    record(f"LLaMA encode {args.preset} ({dtype}, {shapes})", "transformers eager", ours_ms=tj * 1e3,
           peer_ms=tt * 1e3, speedup=tt / tj, ours_compile_s=compile_s,
           ours_peak_gib=None if peak_j is None else peak_j / 2**30,
           peer_peak_gib=None if peak_t is None else peak_t / 2**30, max_abs_diff=err)


if __name__ == "__main__":
    main()
