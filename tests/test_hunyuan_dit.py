"""HunyuanVideo DiT: parity with diffusers' HunyuanVideoTransformer3DModel on the same (noised) weights, text
padding, strict loading and export, eager-call caching, meshes, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fastvideo_jax.configs.models.dits.hunyuanvideo import HUNYUAN_PRESETS
from fastvideo_jax.errors import UserError
from fastvideo_jax.models.loader.component_loader import TransformerLoader, export_component, state_shardings
from fastvideo_jax.models.loader.safetensors_io import SafetensorsCheckpoint
from fastvideo_jax.parallel.activations import mesh_scope
from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh
from fastvideo_jax.parallel.rules import DIT_RULES
from tests.oracles import add_noise, errors

TINY = HUNYUAN_PRESETS["tiny"]
C, TEXT_DIM, POOLED_DIM = TINY["in_channels"], TINY["text_embed_dim"], TINY["pooled_projection_dim"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from diffusers import HunyuanVideoTransformer3DModel

    d = tmp_path_factory.mktemp("hunyuan_dit")
    torch.manual_seed(0)
    ref = add_noise(HunyuanVideoTransformer3DModel(**TINY).eval(), seed=1)
    ref.save_pretrained(d)
    return d, ref


@pytest.fixture(scope="module")
def ours(ckpt):
    return TransformerLoader().load(ckpt[0], precision="fp32")


def _inputs(seed, batch, frames, height, width, text_lens, text_len, guidance):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, frames, height, width, generator=g)
    t = torch.tensor([999.0, 301.0, 17.0][:batch])
    ctx = torch.randn(batch, text_len, TEXT_DIM, generator=g)
    mask = (torch.arange(text_len)[None, :] < torch.tensor(text_lens)[:, None]).long()
    pooled = torch.randn(batch, POOLED_DIM, generator=g)
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=ctx, encoder_attention_mask=mask,
                pooled_projections=pooled, guidance=torch.tensor(guidance))


def _torch(ref, inputs):
    with torch.no_grad():
        return ref(**inputs, return_dict=False)[0].numpy()


def _jax(model, inputs):
    return np.asarray(model(**{k: jnp.asarray(v.numpy()) for k, v in inputs.items()}))


# batch 2, odd latent grids, per-row text lengths with padding (one row unpadded, one of length 1), guidance values
@pytest.mark.parametrize("frames,height,width,text_lens,text_len,guidance", [
    (3, 6, 10, (5, 7), 7, (6000.0, 1000.0)),
    (1, 10, 6, (1, 4), 9, (3500.0, 3500.0)),
    (5, 2, 14, (8, 3), 8, (0.0, 12000.0)),
])
def test_parity_with_diffusers_fp32(ckpt, ours, frames, height, width, text_lens, text_len, guidance):
    inputs = _inputs(frames * 10 + text_len, 2, frames, height, width, text_lens, text_len, guidance)
    ref = _torch(ckpt[1], inputs)
    out = _jax(ours, inputs)
    assert out.shape == ref.shape == (2, C, frames, height, width)
    err, rel = errors(out, ref)
    assert rel <= 1e-4, f"max-abs {err:.3e}, relative {rel:.3e}"


def test_padded_text_tokens_are_never_attended(ours):
    """The padded text tokens' values change nothing (joint attention and the refiner mask them); the same
    change on a real token does change the output (so the check can fail)."""
    inputs = _inputs(3, 2, 3, 6, 10, (4, 6), 8, (6000.0, 1000.0))
    base = _jax(ours, inputs)
    padded = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    padded["encoder_hidden_states"][0, 4:] += 5.0
    padded["encoder_hidden_states"][1, 6:] -= 3.0
    np.testing.assert_allclose(_jax(ours, padded), base, rtol=0, atol=1e-5)
    real = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    real["encoder_hidden_states"][0, 3] += 5.0
    assert np.abs(_jax(ours, real)[0] - base[0]).max() > 1e-3


def test_bf16_as_accurate_as_diffusers_bf16(ckpt):
    """bf16 outputs differ from fp32 by ~1% of scale: ours must be no further from the fp32 reference than
    diffusers' own bf16 run (x1.5 margin for rounding-order noise) and within 2% of scale."""
    from diffusers import HunyuanVideoTransformer3DModel

    d, ref_model = ckpt
    model = TransformerLoader().load(d, precision="bf16")
    assert model.transformer_blocks.attn.to_q.kernel[...].dtype == jnp.bfloat16
    inputs = _inputs(11, 2, 3, 6, 10, (5, 7), 7, (6000.0, 1000.0))
    ref = _torch(ref_model, inputs)
    bf16 = {k: v.bfloat16() if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v
            for k, v in inputs.items()}
    torch_bf16 = HunyuanVideoTransformer3DModel.from_pretrained(d, torch_dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref_bf16 = torch_bf16(**bf16, return_dict=False)[0].float().numpy()
    ours = model(**{k: jnp.asarray(v.float().numpy(), jnp.bfloat16 if v.dtype == torch.bfloat16 else None)
                    for k, v in bf16.items()})
    assert ours.dtype == jnp.bfloat16
    err, rel = errors(np.asarray(ours.astype(jnp.float32)), ref)
    _, rel_torch = errors(ref_bf16, ref)
    assert rel < 2e-2 and rel <= 1.5 * rel_torch, f"ours: max-abs {err:.3e} rel {rel:.3e}; diffusers {rel_torch:.3e}"


def test_random_checkpoint_we_write_loads_in_diffusers(tmp_path):
    """fastvideo_jax.testing.write_random_hunyuan_dit (no torch) writes what diffusers loads and computes as we do."""
    from diffusers import HunyuanVideoTransformer3DModel

    from fastvideo_jax.testing import write_random_hunyuan_dit

    d = write_random_hunyuan_dit(tmp_path / "transformer", seed=4)
    ref = HunyuanVideoTransformer3DModel.from_pretrained(d).eval()
    inputs = _inputs(12, 2, 1, 4, 6, (2, 4), 4, (1000.0, 5000.0))
    err, rel = errors(_jax(TransformerLoader().load(d, precision="fp32"), inputs), _torch(ref, inputs))
    assert rel <= 1e-4, f"max-abs {err:.3e}, relative {rel:.3e}"


def test_without_guidance_embedding(tmp_path):
    """guidance_embeds=false (no guidance_embedder): parity with guidance=None; a guidance value is refused."""
    from diffusers import HunyuanVideoTransformer3DModel

    from fastvideo_jax.models.dits.hunyuanvideo import HunyuanVideoTransformer3DModel as Ours
    from fastvideo_jax.testing.tiny_checkpoints import write_random_component

    d = write_random_component(tmp_path / "transformer", Ours, "HunyuanVideoTransformer3DModel",
                               {**TINY, "guidance_embeds": False}, seed=5)
    ref = HunyuanVideoTransformer3DModel.from_pretrained(d).eval()
    model = TransformerLoader().load(d, precision="fp32")
    assert model.time_text_embed.guidance_embedder is None
    inputs = _inputs(13, 2, 1, 4, 6, (3, 2), 3, (0.0, 0.0))
    inputs.pop("guidance")
    err, rel = errors(_jax(model, inputs), _torch(ref, inputs))
    assert rel <= 1e-4, f"max-abs {err:.3e}, relative {rel:.3e}"
    with pytest.raises(TypeError, match="guidance must be None"):
        model(**{k: jnp.asarray(v.numpy()) for k, v in inputs.items()}, guidance=jnp.ones((2,)))


def test_token_refiner_matches_diffusers_on_every_row(ckpt, ours):
    """The refined text, padded rows included: a padded query attends key 0 alone in diffusers' refiner mask."""
    inputs = _inputs(9, 2, 1, 2, 2, (3, 1), 6, (0.0, 0.0))
    ctx, t, mask = inputs["encoder_hidden_states"], inputs["timestep"], inputs["encoder_attention_mask"]
    with torch.no_grad():
        ref = ckpt[1].context_embedder(ctx, t, mask).numpy()
    out = np.asarray(ours.context_embedder(jnp.asarray(ctx.numpy()), jnp.asarray(t.numpy()),
                                           jnp.asarray(mask.numpy()).astype(bool)))
    err, rel = errors(out, ref)
    assert rel <= 1e-5, f"max-abs {err:.3e}, relative {rel:.3e}"


def test_guidance_changes_the_output(ours):
    a = _jax(ours, _inputs(4, 2, 1, 4, 4, (3, 3), 3, (1000.0, 1000.0)))
    b = _jax(ours, _inputs(4, 2, 1, 4, 4, (3, 3), 3, (1000.0, 7000.0)))
    assert np.abs(a[0] - b[0]).max() < 1e-6 < np.abs(a[1] - b[1]).max()


def test_second_eager_call_does_not_compile(ours, count_compiles):
    inputs = {k: jnp.asarray(v.numpy()) for k, v in _inputs(5, 2, 2, 4, 6, (2, 3), 3, (1000.0, 2000.0)).items()}
    t2 = jnp.asarray(np.asarray(inputs["timestep"]) + 1.0)  # built before counting: an eager op compiles too
    first = np.asarray(ours(**inputs))
    with count_compiles() as compiles:
        second = np.asarray(ours(**dict(inputs, timestep=t2)))
    assert compiles[0] == 0, f"a second eager call with the same shapes compiled {compiles[0]} times"
    assert not np.array_equal(first, second), "the second call must see its own inputs"


def test_every_tensor_mapped_counts_equal_and_export_is_exact(ckpt, ours):
    d, ref = ckpt
    n_params = sum(int(np.prod(v[...].shape)) for _, v in nnx.to_flat_state(nnx.state(ours, nnx.Param)))
    assert n_params == sum(p.numel() for p in ref.parameters())
    saved = SafetensorsCheckpoint.from_dir(d)
    exported = export_component(ours)
    assert sorted(exported) == sorted(saved), f"unmapped: {sorted(set(saved) ^ set(exported))}"
    for key in saved:
        assert np.array_equal(saved.array(key), exported[key]), key


def test_blocks_are_stacked_for_one_scan_per_kind(ours):
    cfg = ours.config.arch_config
    assert ours.transformer_blocks.attn.to_q.kernel[...].shape[0] == cfg.num_layers
    assert ours.single_transformer_blocks.proj_mlp.kernel[...].shape[0] == cfg.num_single_layers
    assert ours.context_embedder.token_refiner.refiner_blocks.ff.fc_in.kernel[...].shape[0] == cfg.num_refiner_layers


def _placed(model, mesh):
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, DIT_RULES, mesh)
    return nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(jax.device_put(v[...], shardings[p])))
                                                    for p, v in nnx.to_flat_state(state)]))


# Video tokens over sequence (joint Ulysses attention, text whole on every device), batch over data / fsdp,
# heads over tensor. 3x3x3 = 27 video tokens: sequence=2 does not divide them (the padded path).
@pytest.mark.parametrize("mesh", [MeshConfig(sequence=2), MeshConfig(data=2, sequence=2),
                                  MeshConfig(data=2, fsdp=2, sequence=2), MeshConfig(data=2, fsdp=2),
                                  MeshConfig(fsdp=2, tensor=2)])
def test_meshes_equal_one_device(ours, mesh):
    inputs = _inputs(6, 2, 3, 6, 6, (2, 5), 5, (1000.0, 4000.0))
    ref = _jax(ours, inputs)
    out = _jax(_placed(ours, make_mesh(mesh)), inputs)
    _, rel = errors(out, ref)
    assert rel <= 1e-5, mesh


def test_tensor_times_sequence_mesh_equals_one_device(tmp_path):
    """4 heads over tensor=2 x sequence=2: each device's text heads must be the same chunk its video got."""
    from fastvideo_jax.models.dits.hunyuanvideo import HunyuanVideoTransformer3DModel as Ours
    from fastvideo_jax.testing.tiny_checkpoints import write_random_component

    d = write_random_component(tmp_path / "transformer", Ours, "HunyuanVideoTransformer3DModel",
                               {**TINY, "num_attention_heads": 4}, seed=6)
    model = TransformerLoader().load(d, precision="fp32")
    inputs = _inputs(14, 2, 3, 6, 6, (4, 2), 5, (1000.0, 3000.0))
    ref = _jax(model, inputs)
    for mesh in (MeshConfig(tensor=2, sequence=2), MeshConfig(data=2, tensor=2, sequence=2)):
        _, rel = errors(_jax(_placed(model, make_mesh(mesh)), inputs), ref)
        assert rel <= 1e-5, mesh


def test_sequence_parallel_runs_all_to_all(ours):
    inputs = {k: jnp.asarray(v.numpy()) for k, v in _inputs(7, 1, 1, 4, 4, (2,), 3, (1000.0,)).items()}

    def hlo(sp):
        mesh = make_mesh(MeshConfig(sequence=sp))
        graphdef, state = nnx.split(_placed(ours, mesh))
        with mesh_scope(mesh):
            return jax.jit(lambda s, kw: nnx.merge(graphdef, s)(**kw)).lower(state, inputs).compile().as_text()

    assert "all-to-all" in hlo(2) and "all-to-all" not in hlo(1)


def test_heads_not_divisible_by_sequence_is_a_clear_error(ours):
    inputs = {k: jnp.asarray(v.numpy()) for k, v in _inputs(7, 1, 1, 4, 4, (2,), 2, (1000.0,)).items()}
    with mesh_scope(make_mesh(MeshConfig(sequence=4))), \
            pytest.raises(UserError, match="2 attention heads do not divide over mesh sequence=4"):
        ours(**inputs)


@pytest.mark.parametrize("change,error,match", [
    (dict(pooled_projections=None), ValueError, "pooled_projections"),
    (dict(guidance=None), ValueError, "guidance_scale \\* 1000"),
    (dict(encoder_attention_mask=np.ones((2, 4), np.int64)), ValueError, "encoder_attention_mask"),
    (dict(hidden_states=np.zeros((2, C, 1, 5, 4), np.float32)), ValueError, "divisible by 2"),
    (dict(encoder_hidden_states_image=np.zeros((2, 1, 4), np.float32)), TypeError, "no image embedding"),
    (dict(timestep=np.zeros((2, 8), np.float32)), ValueError, "timestep of shape \\(2, 8\\)"),
    (dict(guidance=np.zeros((3,), np.float32)), ValueError, "guidance of shape \\(3,\\)"),
    (dict(attention_mask=np.ones((2, 3))), TypeError, "unexpected input"),
])
def test_bad_input_is_a_clear_error(ours, change, error, match):
    inputs = {k: jnp.asarray(v.numpy()) for k, v in _inputs(8, 2, 1, 4, 4, (2, 3), 3, (1000.0, 1000.0)).items()}
    inputs.update({k: None if v is None else jnp.asarray(v) for k, v in change.items()})
    with pytest.raises(error, match=match):
        ours(**inputs)
