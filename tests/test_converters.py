"""Converter engine on synthetic mappings: merges, splits, scanned stacking, strict errors."""

from __future__ import annotations

import numpy as np
import pytest

from converters import ConversionError, LeafSpec, NameMapper, build_plan, export_params
from converters.transforms import flax_shape, from_flax, to_flax

F32 = np.dtype(np.float32)


def _abstract():
    return {
        ("blocks", "qkv", "kernel"): LeafSpec((3, 4, 12), F32, stacked=True),
        ("blocks", "qkv", "bias"): LeafSpec((3, 12), F32, stacked=True),
        ("embed", "embedding"): LeafSpec((10, 4), F32),
        ("conv", "kernel"): LeafSpec((1, 2, 2, 3, 5), F32),
        ("norm", "scale"): LeafSpec((4,), F32),
    }


def _checkpoint(rng):
    t = {}
    for i in range(3):
        for name in "qkv":
            t[f"layers.{i}.attn.{name}.weight"] = rng.normal(size=(4, 4)).astype(np.float32)
            t[f"layers.{i}.attn.{name}.bias"] = rng.normal(size=(4,)).astype(np.float32)
    t["embed.weight"] = rng.normal(size=(10, 4)).astype(np.float32)
    t["conv.weight"] = rng.normal(size=(5, 3, 1, 2, 2)).astype(np.float32)
    t["norm.weight"] = rng.normal(size=(4,)).astype(np.float32)
    return t


MAPPING = [
    (r"^layers\.(\d+)\.attn\.q\.(.*)$", (r"blocks.\1.qkv.\2", 0, 3)),
    (r"^layers\.(\d+)\.attn\.k\.(.*)$", (r"blocks.\1.qkv.\2", 1, 3)),
    (r"^layers\.(\d+)\.attn\.v\.(.*)$", (r"blocks.\1.qkv.\2", 2, 3)),
]
REVERSE = [(r"^blocks\.(\d+)\.qkv\.(.*)$", (r"layers.\1.attn.q.\2", r"layers.\1.attn.k.\2", r"layers.\1.attn.v.\2"))]


def _plan(tensors):
    return build_plan({k: v.shape for k, v in tensors.items()}, _abstract(), NameMapper(MAPPING), ["blocks"])


def _arrays(plan, read):
    return {path: plan.leaf_array(path, read) for path in plan.leaves}


def test_merge_stack_and_transforms():
    t = _checkpoint(np.random.default_rng(0))
    out = _arrays(_plan(t), t.__getitem__)
    for i in range(3):
        fused = np.concatenate([t[f"layers.{i}.attn.{n}.weight"] for n in "qkv"], axis=0).T
        np.testing.assert_array_equal(out[("blocks", "qkv", "kernel")][i], fused)
    np.testing.assert_array_equal(out[("conv", "kernel")], t["conv.weight"].transpose(2, 3, 4, 1, 0))
    np.testing.assert_array_equal(out[("embed", "embedding")], t["embed.weight"])
    np.testing.assert_array_equal(out[("norm", "scale")], t["norm.weight"])


def test_export_inverts_with_splits():
    t = _checkpoint(np.random.default_rng(1))
    out = _arrays(_plan(t), t.__getitem__)
    back = export_params(out, NameMapper(REVERSE), ["blocks"])
    assert sorted(back) == sorted(t)
    for k in t:
        np.testing.assert_array_equal(back[k], t[k], err_msg=k)


def test_cast_in_copy_to_bf16():
    import ml_dtypes

    t = _checkpoint(np.random.default_rng(2))
    abstract = {k: LeafSpec(v.shape, np.dtype(ml_dtypes.bfloat16), v.stacked) for k, v in _abstract().items()}
    plan = build_plan({k: v.shape for k, v in t.items()}, abstract, NameMapper(MAPPING), ["blocks"])
    arr = plan.leaf_array(("norm", "scale"), t.__getitem__)
    assert arr.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(arr, t["norm.weight"].astype(ml_dtypes.bfloat16))


def test_missing_merge_part_is_named():
    t = _checkpoint(np.random.default_rng(0))
    del t["layers.1.attn.k.weight"]
    with pytest.raises(ConversionError, match=r"blocks\.qkv\.kernel\[layer 1\] \(merged from 3 parts, found parts \[0, 2\]\)"):
        _plan(t)


def test_layer_out_of_range_and_unknown():
    t = _checkpoint(np.random.default_rng(0))
    t["layers.3.attn.q.weight"] = np.zeros((4, 4), np.float32)
    t["head.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ConversionError) as e:
        _plan(t)
    msg = str(e.value)
    assert "layers.3.attn.q.weight (layer index does not fit" in msg and "head.weight" in msg


def test_duplicate_target():
    t = _checkpoint(np.random.default_rng(0))
    mapping = MAPPING + [(r"^norm2\.(.*)$", r"norm.\1")]
    t["norm2.weight"] = t["norm.weight"]
    with pytest.raises(ConversionError, match="duplicate"):
        build_plan({k: v.shape for k, v in t.items()}, _abstract(), NameMapper(mapping), ["blocks"])


def test_bad_mapping_target():
    with pytest.raises(ValueError, match="mapping target"):
        NameMapper([("^a$", ("b", 3, 2))])


def test_transforms_invert():
    rng = np.random.default_rng(0)
    for shape in [(3, 4), (5, 3, 2), (5, 3, 2, 2), (5, 3, 1, 2, 2), (7,)]:
        x = rng.normal(size=shape)
        assert flax_shape("kernel", shape) == to_flax(x, "kernel").shape
        np.testing.assert_array_equal(from_flax(to_flax(x, "kernel"), "kernel"), x)


def test_lora_mapping_chains_into_param_mapping():
    from fastvideo_jax.configs.models.dits.wanvideo import WanVideoArchConfig

    cfg = WanVideoArchConfig()
    lora, params = NameMapper(cfg.lora_param_names_mapping), NameMapper(cfg.param_names_mapping)

    def chain(name):
        return params(lora(name).name)

    assert chain("blocks.4.self_attn.o.lora_A.weight").name == "blocks.4.to_out.lora_A.weight"
    assert chain("blocks.4.cross_attn.k.lora_B.weight").name == "blocks.4.attn2.to_k.lora_B.weight"
    assert chain("blocks.0.ffn.0.lora_A.weight").name == "blocks.0.ffn.fc_in.lora_A.weight"


def test_tied_copy_dropped_only_next_to_its_tensor():
    t = _checkpoint(np.random.default_rng(3))
    mapping = MAPPING + [(r"^a_embed_alias\.(.*)$", r"embed.\1")]
    shapes = {k: v.shape for k, v in t.items()}
    both = build_plan({**shapes, "a_embed_alias.weight": (10, 4)}, _abstract(), NameMapper(mapping), ["blocks"],
                      tied_names=["a_embed_alias.weight"])
    assert both.ignored == ["a_embed_alias.weight"]
    assert [s.key for s in both.leaves[("embed", "embedding")].rows[None]] == ["embed.weight"]
    alone = {("a_embed_alias.weight" if k == "embed.weight" else k): v for k, v in shapes.items()}
    plan = build_plan(alone, _abstract(), NameMapper(mapping), ["blocks"], tied_names=["a_embed_alias.weight"])
    assert [s.key for s in plan.leaves[("embed", "embedding")].rows[None]] == ["a_embed_alias.weight"]
    with pytest.raises(ConversionError, match="duplicate"):
        build_plan({**shapes, "a_embed_alias.weight": (10, 4)}, _abstract(), NameMapper(mapping), ["blocks"])
