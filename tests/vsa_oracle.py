"""FastVideo's own video sparse attention, runnable on CPU, as a test oracle.

* ``vsa==0.0.4`` (FastVideo's VSA package, installed ``--no-deps`` from tests/requirements-oracles.txt): its
  ``video_sparse_attn`` (cube-mean coarse attention, top-k of the coarse scores, ``out_c * gate + out_s``) is
  PyTorch; only its block-sparse fine kernel needs a GPU (Triton, or a CUDA extension on H100). The package is
  loaded with that kernel replaced by dense PyTorch attention under the same block mask and per-block valid-token
  counts (the kernel's contract), and with the import-time device query answered as a non-H100 GPU.
* FastVideo 0.1.7's tiling (``fastvideo/attention/backends/video_sparse_attn.py``): the token permutation and the
  per-cube valid counts, its functions executed from the installed wheel's source (the module itself imports
  FastVideo's distributed runtime, so only those function definitions are taken).

Test-only.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import math
import sys
import types

import pytest
import torch

from tests.stepvideo_oracle import fastvideo_file


def dense_block_sparse_attn(q, k, v, block_mask, variable_block_sizes):
    """The fine kernel's contract in plain PyTorch: q, k, v (B, H, S, D) in 64-token blocks; query block i attends
    the keys of the KV blocks j with ``block_mask[b, h, i, j]``, each block's first ``variable_block_sizes[j]``
    keys only. Returns (out, None) like the kernel wrappers."""
    S = q.shape[2]
    blocks = torch.arange(S) // 64
    key_ok = (torch.arange(S) % 64) < variable_block_sizes[blocks]
    mask = block_mask[:, :, blocks][:, :, :, blocks] & key_ok[None, None, None, :]
    s = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v, None


@functools.lru_cache(maxsize=1)
def fastvideo_vsa():
    """``vsa.video_sparse_attn`` (vsa 0.0.4) with the dense fine stage above."""
    if importlib.util.find_spec("vsa") is None:
        pytest.fail("oracle package 'vsa' is not installed: pip install --no-deps -r tests/requirements-oracles.txt")
    wrapper = types.ModuleType("vsa.block_sparse_wrapper")
    wrapper.block_sparse_attn_triton = dense_block_sparse_attn
    sys.modules["vsa.block_sparse_wrapper"] = wrapper
    real = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda *a, **k: (8, 0)  # not an H100: the package takes its Triton path
    try:
        module = importlib.import_module("vsa")
    finally:
        torch.cuda.get_device_capability = real
    assert module.block_sparse_attn is dense_block_sparse_attn
    return module.video_sparse_attn


@functools.lru_cache(maxsize=1)
def _fastvideo_tiling_namespace() -> dict:
    path = fastvideo_file("attention", "backends", "video_sparse_attn.py")
    tree = ast.parse(path.read_text())
    wanted = {"get_tile_partition_indices", "construct_variable_block_sizes", "get_non_pad_index"}
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    nodes += [n for n in tree.body if isinstance(n, ast.Assign)
              and any(getattr(t, "id", None) == "VSA_TILE_SIZE" for t in n.targets)]
    assert {n.name for n in nodes if isinstance(n, ast.FunctionDef)} == wanted, f"{path} changed"
    namespace = {"torch": torch, "math": math, "functools": functools}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def fastvideo_tiling(grid):
    """(tile_partition_indices, variable_block_sizes, non_pad_index) as FastVideo 0.1.7 builds them."""
    ns = _fastvideo_tiling_namespace()
    tile = ns["VSA_TILE_SIZE"]
    num_tiles = tuple(math.ceil(g / t) for g, t in zip(grid, tile))
    cpu = torch.device("cpu")
    index = ns["get_tile_partition_indices"](tuple(grid), tile, cpu)
    sizes = ns["construct_variable_block_sizes"](tuple(grid), num_tiles, cpu)
    non_pad = ns["get_non_pad_index"](sizes, math.prod(tile))
    return index, sizes, non_pad, num_tiles


def fastvideo_video_sparse_attention(q, k, v, gate, grid, topk):
    """FastVideo's VSA on row-major (B, L, N, E) torch tensors: its tiling, ``vsa.video_sparse_attn``, untiling."""
    index, sizes, non_pad, num_tiles = fastvideo_tiling(grid)
    padded = math.prod(num_tiles) * 64

    def tile(x):
        out = torch.zeros((x.shape[0], padded) + x.shape[2:], dtype=x.dtype)
        out[:, non_pad] = x[:, index]
        return out.transpose(1, 2).contiguous()  # (B, N, S, E)

    out = fastvideo_vsa()(tile(q), tile(k), tile(v), variable_block_sizes=sizes, topk=topk, block_size=(4, 4, 4),
                          compress_attn_weight=tile(gate))
    out = out.transpose(1, 2)[:, non_pad]
    return out[:, torch.argsort(index)]
