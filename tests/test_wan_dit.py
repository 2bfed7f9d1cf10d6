"""Wan2.1 DiT: parity with diffusers on the same weights, strict loading, export round trip, bad input."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters import ConversionError
from fastvideo_jax.models.loader.component_loader import TransformerLoader, export_component
from fastvideo_jax.models.loader.safetensors_io import CheckpointError, SafetensorsCheckpoint, save_safetensors
from fastvideo_jax.models.registry import UnknownModelError
from tests.oracles import dit_call, errors, tiny_wan_dit, torch_out, TINY_WAN_I2V

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan_t2v")
    return d, tiny_wan_dit(d)


@pytest.fixture(scope="module")
def t2v_fp32(t2v):
    return TransformerLoader().load(t2v[0], precision="fp32")


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan_i2v")
    return d, tiny_wan_dit(d, seed=3, **{k: v for k, v in TINY_WAN_I2V.items()})


def _inputs(seed, batch, channels, frames, height, width, text_len, text_dim=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, frames, height, width, generator=g)
    t = torch.tensor([999.0, 1.0, 500.0, 250.0][:batch])
    ctx = torch.randn(batch, text_len, text_dim, generator=g)
    return x, t, ctx


def _jx(*tensors):
    return [jnp.asarray(t.numpy()) for t in tensors]


@pytest.mark.parametrize(
    "batch,frames,height,width,text_len",
    [(2, 3, 6, 10, 7), (1, 1, 4, 4, 12), (2, 5, 8, 6, 1), (3, 2, 2, 14, 16)],
)
def test_t2v_parity_fp32(t2v, t2v_fp32, batch, frames, height, width, text_len):
    _, ref_model = t2v
    x, t, ctx = _inputs(batch * 100 + frames, batch, 16, frames, height, width, text_len)
    ref = torch_out(ref_model, x, t, ctx)
    ours = np.asarray(dit_call(t2v_fp32, *_jx(x, t, ctx)))
    assert ours.shape == ref.shape
    err, rel = errors(ours, ref)
    assert err < 1e-4, f"max-abs {err:.3e}, relative {rel:.3e}"


def test_i2v_parity_fp32(i2v):
    # diffusers takes the last 512 context tokens as text (the rest as image): text must be 512 long.
    d, ref_model = i2v
    model = TransformerLoader().load(d, precision="fp32")
    x, t, ctx = _inputs(7, 2, 36, 3, 6, 10, 512)
    img = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(8))
    ref = torch_out(ref_model, x, t, ctx, encoder_hidden_states_image=img)
    ours = np.asarray(dit_call(model, *_jx(x, t, ctx), encoder_hidden_states_image=jnp.asarray(img.numpy())))
    err, rel = errors(ours, ref)
    assert err < 1e-4, f"max-abs {err:.3e}, relative {rel:.3e}"


def test_bf16_as_accurate_as_diffusers_bf16(t2v):
    """bf16 has an 8-bit mantissa, so bf16 outputs differ from fp32 by ~1% of scale. The bound: our bf16
    output is no further from the fp32 reference than diffusers' own bf16 run (x1.5 margin for rounding-order
    noise), and within 2% of scale. Parameter dtypes are as the original's (bf16 matmuls; fp32 norms,
    modulation tables and time embedder)."""
    from diffusers import WanTransformer3DModel

    d, ref_model = t2v
    model = TransformerLoader().load(d, precision="bf16")
    blocks = model.blocks
    assert blocks.to_q.kernel[...].dtype == jnp.bfloat16
    assert blocks.scale_shift_table[...].dtype == jnp.float32
    assert blocks.self_attn_residual_norm.norm.scale[...].dtype == jnp.float32
    assert model.condition_embedder.time_embedder.mlp.fc_in.kernel[...].dtype == jnp.float32
    x, t, ctx = _inputs(11, 2, 16, 3, 6, 10, 7)
    ref = torch_out(ref_model, x, t, ctx)
    torch_bf16 = WanTransformer3DModel.from_pretrained(d, torch_dtype=torch.bfloat16).eval()
    ref_bf16 = torch_out(torch_bf16, x.bfloat16(), t, ctx.bfloat16())
    ours = dit_call(model, jnp.asarray(x.numpy(), jnp.bfloat16), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy(), jnp.bfloat16))
    assert ours.dtype == jnp.bfloat16
    err, rel = errors(np.asarray(ours.astype(jnp.float32)), ref)
    _, rel_torch = errors(ref_bf16, ref)
    assert rel < 2e-2 and rel <= 1.5 * rel_torch, f"ours bf16: max-abs {err:.3e} rel {rel:.3e}; diffusers bf16 rel {rel_torch:.3e}"


def test_every_key_mapped_and_every_param_filled(t2v, t2v_fp32):
    from flax import nnx

    d, ref_model = t2v
    n_params = sum(int(np.prod(v[...].shape)) for _, v in nnx.to_flat_state(nnx.state(t2v_fp32, nnx.Param)))
    n_ref = sum(p.numel() for p in ref_model.parameters())
    assert n_params == n_ref, f"our model holds {n_params} values, the checkpoint {n_ref}"
    ckpt = SafetensorsCheckpoint.from_dir(d)
    exported = export_component(t2v_fp32)
    assert sorted(exported) == sorted(ckpt), f"unmapped: {sorted(set(ckpt) ^ set(exported))}"


def test_export_round_trip_bit_exact(t2v, t2v_fp32):
    ckpt = SafetensorsCheckpoint.from_dir(t2v[0])
    exported = export_component(t2v_fp32)
    for key in ckpt:
        a, b = ckpt.array(key), exported[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert np.array_equal(a, b), f"{key}: export differs from the checkpoint"


def _copy(src, tmp_path):
    dst = tmp_path / "transformer"
    shutil.copytree(src, dst)
    return dst


def _rewrite(d, edit):
    path = d / WEIGHTS
    ckpt = SafetensorsCheckpoint.from_dir(d)
    tensors = {k: np.array(ckpt.array(k)) for k in ckpt}
    edit(tensors)
    save_safetensors(path, tensors)


def _edit_config(d, edit):
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def test_missing_class_name(t2v, tmp_path):
    d = _copy(t2v[0], tmp_path)
    _edit_config(d, lambda c: c.pop("_class_name"))
    with pytest.raises(UnknownModelError, match="_class_name"):
        TransformerLoader().load(d)


def test_unknown_class_lists_registered(t2v, tmp_path):
    d = _copy(t2v[0], tmp_path)
    _edit_config(d, lambda c: c.update(_class_name="MysteryTransformer3DModel"))
    with pytest.raises(Exception, match="MysteryTransformer3DModel") as e:
        TransformerLoader().load(d)
    assert "WanTransformer3DModel" in str(e.value)


def test_missing_config_json(t2v, tmp_path):
    d = _copy(t2v[0], tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        TransformerLoader().load(d)


def test_extra_key(t2v, tmp_path):
    d = _copy(t2v[0], tmp_path)
    _rewrite(d, lambda t: t.update({"blocks.0.attn1.to_z.weight": np.zeros((24, 24), np.float32)}))
    with pytest.raises(ConversionError, match=r"blocks\.0\.attn1\.to_z\.weight"):
        TransformerLoader().load(d)


def test_missing_key(t2v, tmp_path):
    d = _copy(t2v[0], tmp_path)
    _rewrite(d, lambda t: t.pop("blocks.1.ffn.net.2.bias"))
    with pytest.raises(ConversionError, match=r"blocks\.ffn\.fc_out\.bias\[layer 1\]"):
        TransformerLoader().load(d)


def test_wrong_shape(t2v, tmp_path):
    d = _copy(t2v[0], tmp_path)
    _rewrite(d, lambda t: t.update({"proj_out.weight": np.zeros((64, 23), np.float32)}))
    with pytest.raises(ConversionError, match=r"proj_out\.weight: shape \(64, 23\)"):
        TransformerLoader().load(d)


def test_all_problems_in_one_error(t2v, tmp_path):
    d = _copy(t2v[0], tmp_path)

    def edit(t):
        t.pop("scale_shift_table")
        t["extra.weight"] = np.zeros(3, np.float32)

    _rewrite(d, edit)
    with pytest.raises(ConversionError) as e:
        TransformerLoader().load(d)
    assert "extra.weight" in str(e.value) and "scale_shift_table" in str(e.value)


@pytest.mark.parametrize("cut", [4, 100, -7])
def test_truncated_safetensors(t2v, tmp_path, cut):
    d = _copy(t2v[0], tmp_path)
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=WEIGHTS):
        TransformerLoader().load(d)


def test_corrupt_header(t2v, tmp_path):
    d = _copy(t2v[0], tmp_path)
    data = bytearray((d / WEIGHTS).read_bytes())
    data[8:20] = b"#" * 12
    (d / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        TransformerLoader().load(d)


def test_non_dit_class_refused(t2v, tmp_path):
    d = _copy(t2v[0], tmp_path)
    _edit_config(d, lambda c: c.update(_class_name="AutoencoderKLWan"))
    with pytest.raises(CheckpointError, match="not a component of this kind"):
        TransformerLoader().load(d)


def test_input_validation(t2v_fp32):
    with pytest.raises(ValueError, match="divisible by patch"):
        t2v_fp32(jnp.zeros((1, 16, 2, 5, 4)), jnp.zeros((1,)), jnp.zeros((1, 3, 32)))
    with pytest.raises(ValueError, match="16 channels"):
        t2v_fp32(jnp.zeros((1, 8, 2, 4, 4)), jnp.zeros((1,)), jnp.zeros((1, 3, 32)))


def test_loads_from_sharded_index_checkpoint(t2v, t2v_fp32, tmp_path):
    """A checkpoint split over several files with a ``*.safetensors.index.json`` loads like the single file."""
    from flax import nnx

    src = SafetensorsCheckpoint.from_dir(t2v[0])
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_bytes((t2v[0] / "config.json").read_bytes())
    keys = sorted(src)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_safetensors(d / name, {k: np.array(src.array(k)) for k in part})
    weight_map = {k: name for name, part in halves.items() for k in part}
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = TransformerLoader().load(d, precision="fp32")
    ours = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    ref = dict(nnx.to_flat_state(nnx.state(t2v_fp32, nnx.Param)))
    assert ours.keys() == ref.keys()
    assert all(np.array_equal(np.asarray(ours[p][...]), np.asarray(ref[p][...])) for p in ref)


def test_second_eager_call_does_not_compile(t2v, count_compiles):
    """The README's eager use (load, then call): the second same-shape call reuses the executable."""
    model = TransformerLoader().load(t2v[0], precision="fp32")
    x, t, ctx = _jx(*_inputs(5, 1, 16, 2, 4, 6, 3))
    t2 = jnp.asarray(t.__array__() + 1.0)  # built before counting: an eager op compiles too
    first = np.asarray(dit_call(model, x, t, ctx))
    with count_compiles() as compiles:
        second = np.asarray(dit_call(model, x, t2, ctx))
    assert compiles[0] == 0, f"a second eager call with the same shapes compiled {compiles[0]} times"
    assert not np.array_equal(first, second), "the second call must see its own inputs"


@pytest.mark.parametrize("precision,knob,expect", [
    ("fp32", None, "HIGHEST"), ("fp32", "default", "DEFAULT"),
    ("bf16", None, "DEFAULT"), ("bf16", "highest", "HIGHEST"),
])
def test_matmul_precision_knob_reaches_every_matmul(t2v, matmul_precisions, precision, knob, expect):
    """fp32 runs every matmul (attention included) at HIGHEST unless the knob says otherwise; bf16 at DEFAULT."""
    model = TransformerLoader().load(t2v[0], precision=precision, matmul_precision=knob)
    x, t, ctx = _jx(*_inputs(5, 1, 16, 2, 4, 6, 3))
    found = matmul_precisions(lambda *a: dit_call(model, *a), x, t, ctx)
    assert len(found) >= 12, f"expected every projection and attention matmul, found {len(found)}"
    names = set(found)
    assert names == {expect}, f"matmul precisions {names}, expected only {expect}"


def test_parity_at_real_head_size(tmp_path):
    """Head dim 128 (the RoPE split 44/42/42 of the real models), 1,024 video tokens, 2 heads, 2 layers: the
    real-size attention and RoPE code paths, still a few seconds on CPU."""
    real = dict(num_attention_heads=2, attention_head_dim=128, ffn_dim=256, text_dim=64, rope_max_seq_len=1024)
    ref_model = tiny_wan_dit(tmp_path, seed=9, **real)
    model = TransformerLoader().load(tmp_path, precision="fp32")
    x, _, ctx = _inputs(11, 1, 16, 4, 32, 32, 24, text_dim=64)  # (4, 16, 16) patches = 1,024 tokens
    # A small timestep: at t ~ 1000 one fp32 ulp of a sinusoid frequency (exp rounds differently in XLA and
    # PyTorch, see test_layers) moves the time embedding enough to give ~1e-4 here whatever the rest does.
    # Measured at t=1: 1.3e-5 max-abs (PyTorch fp32 is 9.4e-6 from its float64 run). Large t: the tiny tests.
    t = torch.tensor([1.0])
    ref = torch_out(ref_model, x, t, ctx)
    err, rel = errors(dit_call(model, *_jx(x, t, ctx)), ref)
    assert err < 1e-4, f"max-abs {err:.3e}, relative {rel:.3e}"


def test_bad_matmul_precision_is_a_clear_error(t2v):
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        TransformerLoader().load(t2v[0], precision="fp32", matmul_precision="fastest")
