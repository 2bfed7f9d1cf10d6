"""StepVideo DiT: parity with the PyTorch ``StepVideoModel`` (DiffSynth 1.1.9, the original StepFun code) on the
same noised weights saved in the checkpoint layout; padded text masks; FastVideo's module names; export; bad
input; the sequence mesh axis."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fastvideo_jax.configs.models.dits.stepvideo import STEPVIDEO_PRESETS
from fastvideo_jax.models.loader.component_loader import TransformerLoader, export_component
from fastvideo_jax.models.loader.safetensors_io import SafetensorsCheckpoint
from tests.oracles import add_noise, errors
from tests.stepvideo_oracle import diffsynth_module

TINY = STEPVIDEO_PRESETS["tiny"]
C, (LLM_DIM, CLIP_DIM) = TINY["in_channels"], TINY["caption_channels"]


def _oracle(seed=0, **overrides):
    torch.manual_seed(seed)
    arch = {**TINY, "caption_channels": list(TINY["caption_channels"]), **overrides}
    return add_noise(diffsynth_module("stepvideo_dit").StepVideoModel(**arch).eval(), seed=seed + 1), arch


def _save(directory, model, arch, rename=lambda k: k):
    """The checkpoint layout of stepfun-ai/stepvideo-t2v and FastVideo/stepvideo-t2v-diffusers: the module's own
    state_dict names in safetensors, with a transformer/config.json naming StepVideoModel."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {rename(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"_class_name": "StepVideoModel", **arch}))
    return directory


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    ref, arch = _oracle()
    return _save(tmp_path_factory.mktemp("stepvideo_dit"), ref, arch), ref


@pytest.fixture(scope="module")
def ours(ckpt):
    return TransformerLoader().load(ckpt[0], precision="fp32")


def _inputs(seed, batch, frames, height, width, llm_lens, llm_len, clip_len=5):
    g = torch.Generator().manual_seed(seed)
    llm_mask = (torch.arange(llm_len)[None, :] < torch.tensor(llm_lens)[:, None]).float()
    return dict(
        hidden_states=torch.randn(batch, C, frames, height, width, generator=g),
        timestep=torch.tensor([0.93, 0.31, 0.02][:batch]),
        encoder_hidden_states=torch.randn(batch, llm_len, LLM_DIM, generator=g),
        encoder_hidden_states_2=torch.randn(batch, clip_len, CLIP_DIM, generator=g),
        # the original pipeline's mask: the LLM mask padded with the CLIP length of ones in front
        encoder_attention_mask=torch.nn.functional.pad(llm_mask, (clip_len, 0), value=1.0),
    )


def _torch(ref, inputs):
    x = inputs["hidden_states"].permute(0, 2, 1, 3, 4)  # the oracle takes (B, F, C, H, W)
    with torch.no_grad():
        out = ref(**dict(inputs, hidden_states=x))
    return out.permute(0, 2, 1, 3, 4).float().numpy()


def _jax(model, inputs, **replace):
    return np.asarray(model(**{k: jnp.asarray(v.numpy()) for k, v in {**inputs, **replace}.items()}))


# batch 2, odd latent grids, per-row LLM lengths with padding (one row unpadded)
@pytest.mark.parametrize("frames,height,width,llm_lens,llm_len", [
    (3, 6, 10, (5, 7), 7),
    (1, 10, 6, (1, 4), 9),
    (5, 2, 14, (8, 3), 8),
])
def test_parity_with_oracle_fp32(ckpt, ours, frames, height, width, llm_lens, llm_len):
    inputs = _inputs(frames * 10 + llm_len, 2, frames, height, width, llm_lens, llm_len)
    ref = _torch(ckpt[1], inputs)
    out = _jax(ours, inputs)
    assert out.shape == ref.shape == (2, C, frames, height, width)
    err, rel = errors(out, ref)
    print(f"StepVideo DiT fp32 vs oracle: max-abs {err:.3e}, relative {rel:.3e}")
    assert rel <= 1e-4, f"max-abs {err:.3e}, relative {rel:.3e}"


def test_llm_mask_alone_is_padded_for_the_clip_tokens(ckpt, ours):
    """A (B, Lt) LLM mask gives what the original gives for the mask padded with the CLIP length of ones."""
    inputs = _inputs(7, 2, 2, 4, 6, (2, 6), 6, clip_len=4)
    llm_mask = inputs["encoder_attention_mask"][:, 4:]
    out = _jax(ours, inputs, encoder_attention_mask=llm_mask)
    err, rel = errors(out, _torch(ckpt[1], inputs))
    assert rel <= 1e-4, f"max-abs {err:.3e}, relative {rel:.3e}"


def test_padded_text_tokens_are_never_attended(ours):
    inputs = _inputs(3, 2, 2, 4, 6, (3, 6), 8)
    base = _jax(ours, inputs)
    padded = inputs["encoder_hidden_states"].clone()
    padded[0, 3:] = torch.randn(5, LLM_DIM) * 4  # (caption_norm would erase a constant shift)
    padded[1, 6:] = torch.randn(2, LLM_DIM) * 4
    np.testing.assert_allclose(_jax(ours, inputs, encoder_hidden_states=padded), base, rtol=0, atol=1e-5)
    real = inputs["encoder_hidden_states"].clone()
    real[0, 2] = torch.randn(LLM_DIM) * 4
    assert np.abs(_jax(ours, inputs, encoder_hidden_states=real)[0] - base[0]).max() > 1e-3


def test_fastvideo_module_names_load_the_same_model(tmp_path, ckpt, ours):
    """A checkpoint under FastVideo 0.1.7's own module names (its param_names_mapping applied) loads to the
    same parameters."""
    import re

    from tests.stepvideo_oracle import fastvideo_file

    source = fastvideo_file("configs", "models", "dits", "stepvideo.py").read_text()
    rules = re.findall(r'r"(\^[^"]+)":\s*r"([^"]+)"', source)
    assert len(rules) == 8, rules

    def rename(name):
        for pattern, target in rules:
            if re.match(pattern, name):
                return re.sub(pattern, target, name)
        return name

    ref = ckpt[1]
    renamed = {rename(k) for k in ref.state_dict()}
    assert "transformer_blocks.0.norm1.norm.weight" in renamed and "adaln_single.emb.mlp.fc_in.weight" in renamed
    arch = json.loads((ckpt[0] / "config.json").read_text())
    model = TransformerLoader().load(_save(tmp_path / "fv", ref, arch, rename), precision="fp32")
    theirs = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(ours, nnx.Param)):
        assert np.array_equal(np.asarray(var[...]), np.asarray(theirs[path][...])), path


def test_every_tensor_mapped_and_export_is_exact(ckpt, ours):
    d, ref = ckpt
    n_params = sum(int(np.prod(v[...].shape)) for _, v in nnx.to_flat_state(nnx.state(ours, nnx.Param)))
    assert n_params == sum(p.numel() for p in ref.parameters())
    saved = SafetensorsCheckpoint.from_dir(d)
    exported = export_component(ours)
    assert sorted(exported) == sorted(saved), f"unmapped: {sorted(set(saved) ^ set(exported))}"
    for key in saved:
        assert np.array_equal(saved.array(key), exported[key]), key
    assert ours.transformer_blocks.attn1.wqkv.kernel[...].shape[0] == TINY["num_layers"]  # stacked for one scan


def test_bad_inputs_are_refused_by_name(ours):
    inputs = {k: jnp.asarray(v.numpy()) for k, v in _inputs(1, 2, 1, 2, 2, (2, 2), 3).items()}
    with pytest.raises(ValueError, match="encoder_attention_mask .* must be"):
        ours(**dict(inputs, encoder_attention_mask=jnp.ones((2, 4))))
    with pytest.raises(ValueError, match="need 8 channels"):
        ours(**dict(inputs, hidden_states=jnp.ones((2, 4, 1, 2, 2))))
    with pytest.raises(ValueError, match="encoder_hidden_states_2 .* expected"):
        ours(**dict(inputs, encoder_hidden_states_2=jnp.ones((2, 5, 7))))
    with pytest.raises(ValueError, match="no text token"):
        ours(**dict(inputs, encoder_attention_mask=jnp.zeros((2, 8)).at[0].set(1)))
    with pytest.raises(TypeError, match="no guidance"):
        ours(**inputs, guidance=jnp.ones((2,)))
    with pytest.raises(TypeError, match="unexpected input"):
        ours(**inputs, pooled_projections=jnp.ones((2, 4)))


def test_random_checkpoint_we_write_loads_in_the_oracle(tmp_path):
    """fastvideo_jax.testing.write_random_stepvideo_dit (no torch) writes the checkpoint layout: the oracle takes
    its tensors by name (strict) and computes what we compute."""
    from safetensors.torch import load_file

    from fastvideo_jax.testing import write_random_stepvideo_dit

    d = write_random_stepvideo_dit(tmp_path / "transformer", seed=4)
    assert json.loads((d / "config.json").read_text())["_class_name"] == "StepVideoModel"
    ref, _ = _oracle()
    ref.load_state_dict(load_file(str(d / "diffusion_pytorch_model.safetensors")), strict=True)
    inputs = _inputs(12, 2, 1, 4, 6, (2, 4), 4)
    err, rel = errors(_jax(TransformerLoader().load(d, precision="fp32"), inputs), _torch(ref, inputs))
    assert rel <= 1e-4, f"max-abs {err:.3e}, relative {rel:.3e}"


def test_second_eager_call_does_not_compile(ours, count_compiles):
    inputs = {k: jnp.asarray(v.numpy()) for k, v in _inputs(5, 2, 2, 4, 6, (2, 3), 3).items()}
    t2 = jnp.asarray(np.asarray(inputs["timestep"]) * 0.5)  # built before counting: an eager op compiles too
    first = np.asarray(ours(**inputs))
    with count_compiles() as compiles:
        second = np.asarray(ours(**dict(inputs, timestep=t2)))
    assert compiles[0] == 0, f"a second eager call with the same shapes compiled {compiles[0]} times"
    assert not np.array_equal(first, second), "the second call must see its own inputs"


def test_bf16_as_accurate_as_the_oracle_in_bf16(ckpt):
    """bf16 differs from fp32 by ~1% of scale: ours must be no further from the fp32 oracle than the oracle's own
    bf16 run (x1.5 margin for rounding-order noise) and within 2% of scale."""
    import copy

    model = TransformerLoader().load(ckpt[0], precision="bf16")
    assert model.transformer_blocks.attn1.wqkv.kernel[...].dtype == jnp.bfloat16
    inputs = _inputs(11, 2, 2, 4, 6, (3, 6), 6)
    ref = _torch(ckpt[1], inputs)
    bf16 = {k: v if k == "encoder_attention_mask" else v.bfloat16() for k, v in inputs.items()}
    ref_bf16 = _torch(copy.deepcopy(ckpt[1]).bfloat16(), bf16)
    # The timestep stays fp32 for us, as pipelines pass it (t * 1000 feeds a sinusoid: bf16's 0.93 -> 0.9297 alone
    # moves the output by ~10% of scale); the oracle's bf16 run takes it in bf16, as diffsynth's pipeline does.
    ours = model(**{k: jnp.asarray(v.float().numpy(), jnp.bfloat16) for k, v in bf16.items()
                    if k not in ("timestep", "encoder_attention_mask")},
                 timestep=jnp.asarray(inputs["timestep"].numpy()),
                 encoder_attention_mask=jnp.asarray(inputs["encoder_attention_mask"].numpy()))
    assert ours.dtype == jnp.bfloat16
    err, rel = errors(np.asarray(ours.astype(jnp.float32)), ref)
    _, rel_torch = errors(ref_bf16.astype(np.float32), ref)
    print(f"StepVideo DiT bf16: ours {rel:.3e}, oracle bf16 {rel_torch:.3e} relative to the fp32 oracle")
    assert rel < 2e-2 and rel <= 1.5 * rel_torch, f"ours: max-abs {err:.3e} rel {rel:.3e}; oracle {rel_torch:.3e}"
