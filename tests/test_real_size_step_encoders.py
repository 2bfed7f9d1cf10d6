"""StepVideo's text encoders at their real sizes map completely: the PyTorch classes' parameter names and shapes
(built on the meta device, no memory) convert onto our abstract models with no unknown, missing or mis-shaped
tensor, and in the same total size (the helper is tests/test_real_size_plans.py's)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from tests.test_real_size_plans import _plan


def test_hunyuan_clip_bert_real_size():
    """StepVideo's ``hunyuan_clip/clip_text_encoder``: 24 x 1024 BertModel, its pooler dropped (never used)."""
    from transformers import BertConfig, BertModel

    from fastvideo_jax.configs.models.encoders.bert import BERT_PRESETS
    from fastvideo_jax.models.encoders.bert import BertModel as Ours

    arch = dict(BERT_PRESETS["hunyuan-clip"])
    with torch.device("meta"):
        ref = BertModel(BertConfig(**arch))
    n, specs = _plan(ref, Ours, arch)
    pooler = 1024 * 1024 + 1024  # 47020 x 1024 words + 512 positions + 2 types + LN, 24 x 12_596_224 per layer
    assert n == sum(p.numel() for p in ref.parameters()) - pooler == 350_986_240, n
    assert {spec.dtype for spec in specs.values()} == {np.dtype("float32")}, "default precision is fp32"
    assert specs[("encoder", "layer", "attention", "self", "query", "kernel")].shape == (24, 1024, 1024)
    assert specs[("embeddings", "word_embeddings", "embedding")].shape == (47020, 1024)


def test_step_llm_real_size(monkeypatch):
    """StepVideo's ``step_llm`` as diffsynth's Step1Model (bf16 as shipped): fused wqkv (6144 + 2 x 4 x 128 outputs),
    fused SwiGLU w1, 48 layers (the preset's unverified fields: see configs/models/encoders/stepllm.py)."""
    import contextlib

    from tests.stepvideo_oracle import diffsynth_module
    from tests.test_stepllm import _oracle_config

    from fastvideo_jax.configs.models.encoders.stepllm import STEPLLM_PRESETS
    from fastvideo_jax.models.encoders.stepllm import Step1Model as Ours

    oracle = diffsynth_module("stepvideo_text_encoder")
    # The original builds on the CPU whatever the device context; let the meta device hold it (no memory).
    monkeypatch.setattr(oracle, "EmptyInitOnDevice", lambda device: contextlib.nullcontext())
    arch = dict(STEPLLM_PRESETS["step-llm"])
    with torch.device("meta"):
        ref = oracle.Step1Model(_oracle_config(**arch))
    n, specs = _plan(ref, Ours, arch)
    per_layer = 6144 * (6144 + 1024) + 6144 * 6144 + 6144 * 2 * 16384 + 16384 * 6144 + 2 * 6144
    assert n == sum(p.numel() for p in ref.parameters()) == 65536 * 6144 + 48 * per_layer, n
    assert {spec.dtype for spec in specs.values()} == {np.dtype(jnp.bfloat16)}, "default precision is bf16"
    assert specs[("transformer", "layers", "attention", "wqkv", "kernel")].shape == (48, 6144, 6144 + 1024)
    assert specs[("transformer", "layers", "feed_forward", "w1", "kernel")].shape == (48, 6144, 2 * 16384)
