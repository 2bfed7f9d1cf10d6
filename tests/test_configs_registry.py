"""Frozen configs, config.json updates, presets, and the lazy model registry."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys

import pytest

from fastvideo_jax.configs.models.dits.wanvideo import WAN_PRESETS, WanVideoArchConfig, WanVideoConfig, wan_preset
from fastvideo_jax.models.registry import (
    ModelRegistry,
    UnknownModelError,
    register_model,
    resolve_model_cls,
)


def test_update_model_arch_drops_hub_keys_and_reports_unknown(caplog):
    raw = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0", "num_layers": 30,
           "num_attention_heads": 12, "patch_size": [1, 2, 2], "brand_new_knob": 7}
    with caplog.at_level(logging.WARNING):
        cfg = WanVideoArchConfig().update_model_arch(raw)
    assert cfg.num_layers == 30 and cfg.hidden_size == 12 * 128 and cfg.patch_size == (1, 2, 2)
    assert dict(cfg.unrecognized) == {"brand_new_knob": 7}
    assert "brand_new_knob" in caplog.text and "_diffusers_version" not in caplog.text


def test_arch_config_is_frozen_and_hashable():
    cfg = wan_preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_layers = 3
    assert hash(cfg) == hash(wan_preset("tiny"))


def test_model_config_falls_through_and_is_strict():
    mc = WanVideoConfig().update_model_arch(WAN_PRESETS["wan2.1-t2v-1.3b"])
    assert mc.num_layers == 30 and mc.ffn_dim == 8960 and mc.precision == "bf16"
    assert mc.update_model_config(precision="fp32").precision == "fp32"
    with pytest.raises(AttributeError, match="no option"):
        mc.update_model_config(num_layerz=3)
    with pytest.raises(AttributeError, match="nor has its arch_config"):
        mc.not_a_field


def test_to_dict_round_trips():
    cfg = wan_preset("wan2.1-i2v-14b")
    again = WanVideoArchConfig().update_model_arch(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and "param_names_mapping" not in cfg.to_dict() and "hidden_size" not in cfg.to_dict()


def test_unknown_preset_lists_presets():
    with pytest.raises(KeyError, match="tiny"):
        wan_preset("nope")


def test_bad_arch_values():
    with pytest.raises(ValueError, match="qk_norm"):
        WanVideoArchConfig().update_model_arch({"qk_norm": "layer_norm"})


def test_resolve_by_class_name_and_architectures():
    cls, name = resolve_model_cls({"_class_name": "WanTransformer3DModel"})
    assert name == "WanTransformer3DModel" and cls.__name__ == "WanTransformer3DModel"
    _, name = ModelRegistry.resolve_model_cls(["NotThere", "WanTransformer3DModel"])
    assert name == "WanTransformer3DModel"
    assert ModelRegistry.is_registered("UMT5EncoderModel") and ModelRegistry.is_registered("AutoencoderKLWan")


def test_unknown_class_lists_registered():
    with pytest.raises(UnknownModelError) as e:
        resolve_model_cls({"architectures": ["GPT9Model"]})
    assert "GPT9Model" in str(e.value) and "WanTransformer3DModel" in str(e.value)
    with pytest.raises(UnknownModelError, match="neither '_class_name'"):
        resolve_model_cls({"hidden_size": 3})


@pytest.fixture
def restore_registry():
    """register_model changes process-wide tables: put them back after the test."""
    from fastvideo_jax.models import registry

    entries = dict(registry.ModelRegistry._entries)
    kinds = {k: dict(v) for k, v in registry._KINDS.items()}
    yield
    registry.ModelRegistry._entries.clear()
    registry.ModelRegistry._entries.update(entries)
    for k, v in kinds.items():
        registry._KINDS[k].clear()
        registry._KINDS[k].update(v)


def test_register_out_of_tree(restore_registry):
    from fastvideo_jax.models.registry import class_names

    class MyDiT:
        pass

    register_model("MyDiT3DModel", MyDiT, kind="dit")
    assert resolve_model_cls({"_class_name": "MyDiT3DModel"})[0] is MyDiT
    assert "MyDiT3DModel" in class_names("dit") and "MyDiT3DModel" not in class_names("vae")
    register_model("MyOtherDiT", "fastvideo_jax.models.dits.wanvideo:WanTransformer3DModel", kind="dit")
    assert resolve_model_cls({"_class_name": "MyOtherDiT"})[0].__name__ == "WanTransformer3DModel"
    with pytest.raises(ValueError, match="module:Class"):
        register_model("Bad", "no_colon_here", kind="dit")
    with pytest.raises(ValueError, match="pass kind="):
        register_model("NoKind", MyDiT)
    with pytest.raises(ValueError, match="unknown kind 'unet'"):
        register_model("BadKind", MyDiT, kind="unet")


def test_registry_import_is_lazy():
    code = (
        "import sys, fastvideo_jax.models.registry as r\n"
        "assert 'fastvideo_jax.models.dits.wanvideo' not in sys.modules\n"
        "r.resolve_model_cls({'_class_name': 'WanTransformer3DModel'})\n"
        "assert 'fastvideo_jax.models.dits.wanvideo' in sys.modules\n"
        "print('lazy-ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "lazy-ok" in out.stdout, out.stderr
