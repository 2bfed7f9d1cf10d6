"""LoRA on HunyuanVideo (the Wan machinery with Hunyuan's target table): both directions against diffusers'
HunyuanVideoTransformer3DModel with peft adapters (noised A and B, alpha != r)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fastvideo_jax.models.layers.lora import inject_lora, remove_lora
from fastvideo_jax.models.loader.component_loader import TransformerLoader
from fastvideo_jax.models.loader.lora_io import load_lora, save_lora
from tests.oracles import errors
from tests.test_lora import _noise_adapters

peft = pytest.importorskip("peft")


def test_hunyuan_lora_both_ways(tmp_path):
    """HunyuanVideo is a table away: a peft LoRA on diffusers' model loads in ours with its output, and the
    adapters we inject on the ArchConfig's targets save to a file diffusers' Hunyuan loader reads."""
    from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    from fastvideo_jax.configs.models.dits.hunyuanvideo import HUNYUAN_PRESETS
    from tests.oracles import add_noise

    tiny = HUNYUAN_PRESETS["tiny"]
    torch.manual_seed(0)
    ref = add_noise(HunyuanVideoTransformer3DModel(**tiny).eval(), seed=1)
    ref.save_pretrained(tmp_path / "dit")
    g = torch.Generator().manual_seed(2)
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 4, 6, generator=g), timestep=torch.tensor([700.0]),
                  encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
                  encoder_attention_mask=torch.ones(1, 5, dtype=torch.long),
                  pooled_projections=torch.randn(1, 12, generator=g), guidance=torch.tensor([3500.0]))

    def run_torch(model):
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0].numpy()

    def run_ours(model):
        return np.asarray(model(**{k: jnp.asarray(v.numpy()) for k, v in inputs.items()}))

    ours = TransformerLoader().load(tmp_path / "dit", precision="fp32")
    paths = inject_lora(ours, rank=2, alpha=3, rngs=nnx.Rngs(1))
    assert "single_transformer_blocks.proj_out" in paths and "proj_out" not in paths
    assert not any(p.startswith("context_embedder") for p in paths)
    _noise_adapters(ours, seed=3)
    out = run_ours(ours)
    save_lora(ours, tmp_path / "ours")
    state = HunyuanVideoPipeline.lora_state_dict(tmp_path / "ours", weight_name="pytorch_lora_weights.safetensors")
    HunyuanVideoPipeline.load_lora_into_transformer(state, transformer=ref)
    err, rel = errors(out, run_torch(ref))
    assert rel <= 1e-4, f"our Hunyuan LoRA in diffusers: max-abs {err:.3e}, relative {rel:.3e}"

    torch.manual_seed(0)
    theirs = add_noise(HunyuanVideoTransformer3DModel(**tiny).eval(), seed=1)  # the same base weights
    config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["to_q", "to_k", "add_v_proj", "to_add_out",
                                                                "proj_mlp", "ff.net.2"])
    theirs.add_adapter(config)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    HunyuanVideoPipeline.save_lora_weights(tmp_path / "theirs",
                                           transformer_lora_layers=peft.utils.get_peft_model_state_dict(theirs),
                                           transformer_lora_adapter_metadata=config.to_dict())
    remove_lora(ours)
    load_lora(ours, tmp_path / "theirs", merge=False)
    err, rel = errors(run_ours(ours), run_torch(theirs))
    assert rel <= 1e-4, f"diffusers' Hunyuan LoRA in ours: max-abs {err:.3e}, relative {rel:.3e}"
