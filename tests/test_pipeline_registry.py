"""Pipeline registry and composed pipelines: ``_class_name`` resolves the pipeline class, the class says which
components it loads and which defaults an unknown checkpoint of its family gets, stages thread one batch."""

from __future__ import annotations

import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastvideo_jax.configs.pipelines.base import PipelineConfig
from fastvideo_jax.configs.sample import WAN_NEGATIVE_PROMPT, SamplingParam
from fastvideo_jax.entrypoints.model_spec import ModelSpec
from fastvideo_jax.errors import CheckpointError, UserError
from fastvideo_jax.models.loader import component_loader
from fastvideo_jax.pipelines import ComposedPipeline, ForwardBatch, register_pipeline, resolve_pipeline_cls
from fastvideo_jax.pipelines.registry import PipelineRegistry
from fastvideo_jax.pipelines.stages import PipelineStage
from fastvideo_jax.pipelines.wan import WanPipeline
from fastvideo_jax.testing.tiny_pipeline import write_tiny_wan_pipeline


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return write_tiny_wan_pipeline(tmp_path_factory.mktemp("registry") / "tiny")


@pytest.fixture
def copy_of(tiny_root, tmp_path):
    def make(edit_index=None, edit_dit=None):
        root = tmp_path / "copy"
        shutil.copytree(tiny_root, root)
        for path, edit in ((root / "model_index.json", edit_index), (root / "transformer" / "config.json", edit_dit)):
            if edit is not None:
                data = json.loads(path.read_text())
                edit(data)
                path.write_text(json.dumps(data))
        return root

    return make


@pytest.fixture
def no_weight_reads(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(component_loader, "load_component", refuse)


@pytest.fixture
def registry_entry():
    """Registrations made by a test are removed after it (the registry is process-wide)."""
    saved = dict(PipelineRegistry._entries)
    yield
    PipelineRegistry._entries.clear()
    PipelineRegistry._entries.update(saved)


def test_class_name_resolves_the_pipeline(tiny_root, no_weight_reads):
    assert resolve_pipeline_cls("WanPipeline") is WanPipeline
    spec = ModelSpec.open(tiny_root)
    assert spec.pipeline_cls is WanPipeline
    assert spec.components == ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")


def test_unknown_pipeline_is_a_clear_error_before_any_weight(copy_of, no_weight_reads):
    root = copy_of(edit_index=lambda d: d.update(_class_name="MochiPipeline"))
    with pytest.raises(CheckpointError, match=r"model_index.json: pipeline 'MochiPipeline' is not supported "
                                              r"\(supported: \[.*'WanPipeline'.*\]\)"):
        ModelSpec.open(root)


def test_missing_required_component_is_named(copy_of, no_weight_reads):
    root = copy_of(edit_index=lambda d: d.pop("vae"))
    with pytest.raises(CheckpointError, match=r"WanPipeline needs the components \['vae'\]"):
        ModelSpec.open(root)


def test_unknown_wan_checkpoint_gets_wan_family_defaults_logged(copy_of, no_weight_reads, caplog):
    root = copy_of(edit_dit=lambda d: d.update(num_layers=3))  # no preset's signature matches
    with caplog.at_level(logging.WARNING):
        spec = ModelSpec.open(root)
    assert "using WanPipeline's generic defaults" in caplog.text
    assert spec.defaults.negative_prompt == WAN_NEGATIVE_PROMPT and spec.config.flow_shift == 3.0


class _Doubler(PipelineStage):
    def __call__(self, batch):
        return batch.replace(latents=batch.latents * 2)


class _Plus(PipelineStage):
    def __init__(self, amount):
        self.amount = amount

    def __call__(self, batch):
        return batch.replace(latents=batch.latents + self.amount)


class _ToyPipeline(ComposedPipeline):
    _required_components = ("transformer",)
    _optional_components = ("transformer_2",)

    def create_stages(self):
        return [_Doubler(), _Plus(self.transformer)]


def test_out_of_tree_pipeline_without_defaults_is_refused_not_given_wans(copy_of, no_weight_reads, registry_entry):
    register_pipeline("ToyPipeline", _ToyPipeline)
    root = copy_of(edit_index=lambda d: d.update(_class_name="ToyPipeline"),
                   edit_dit=lambda d: d.update(num_layers=3))
    with pytest.raises(UserError, match="no registered presets match it and ToyPipeline has no generic defaults"):
        ModelSpec.open(root)


def test_stages_thread_one_batch_and_components_are_checked():
    pipe = _ToyPipeline({"transformer": 3.0}, PipelineConfig())
    param = SamplingParam(prompt="x", guidance_scale=1.0)
    out = pipe.run(pipe.initial_batch(param, jnp.ones((1, 2))))
    np.testing.assert_array_equal(out.latents, np.full((1, 2), 5.0))
    assert pipe.stage(_Plus).amount == 3.0 and pipe.transformer == 3.0 and pipe.transformer_2 is None
    assert _ToyPipeline.components_to_load({"transformer": ("x", "T"), "transformer_2": (None, None)}) == [
        "transformer"]
    assert _ToyPipeline.components_to_load({"transformer": ("x", "T"), "transformer_2": ("x", "T")}) == [
        "transformer", "transformer_2"]
    with pytest.raises(CheckpointError, match=r"_ToyPipeline needs the component\(s\) \['transformer'\]"):
        _ToyPipeline({}, PipelineConfig())
    with pytest.raises(ValueError, match=r"got unknown \['vae'\]"):
        _ToyPipeline({"transformer": 1.0, "vae": 2.0}, PipelineConfig())
    with pytest.raises(LookupError, match="has no DecodingStage"):
        from fastvideo_jax.pipelines.stages import DecodingStage

        pipe.stage(DecodingStage)


def test_forward_batch_is_a_pytree_with_a_static_request():
    param = SamplingParam(prompt="a cat")
    batch = ForwardBatch(param=param, do_cfg=True, conditioning={"encoder_hidden_states": jnp.ones((2, 3, 4))},
                         latents=jnp.zeros((1, 16, 1, 2, 2)))
    leaves, treedef = jax.tree.flatten(batch)
    assert len(leaves) == 2  # the conditioning array and the latents; the request and CFG flag are static
    doubled = jax.jit(lambda b: jax.tree.map(lambda a: a * 2, b))(batch)
    assert doubled.param is param and doubled.do_cfg
    np.testing.assert_array_equal(doubled.conditioning["encoder_hidden_states"], 2 * np.ones((2, 3, 4)))


def test_a_new_step_count_compiles_nothing_in_timestep_preparation(count_compiles):
    from fastvideo_jax.pipelines.stages import TimestepPreparationStage
    from fastvideo_jax.schedulers.flow_match_euler import FlowMatchEulerScheduler
    from fastvideo_jax.schedulers.flow_unipc import FlowUniPCMultistepScheduler
    from fastvideo_jax.testing.tiny_pipeline import UNIPC_FLOW_CONFIG

    for scheduler in (FlowMatchEulerScheduler(shift=3.0), FlowUniPCMultistepScheduler.from_config(UNIPC_FLOW_CONFIG)):
        stage = TimestepPreparationStage(scheduler)
        stage.tables(3)
        with count_compiles() as compiles:
            tables = stage.tables(7)
        assert compiles[0] == 0, f"{type(scheduler).__name__}: a new step count compiled {compiles[0]} times"
        assert {leaf.shape[0] for leaf in jax.tree.leaves(tables)} <= {1000, 1001}  # n or n + 1 entries, padded
