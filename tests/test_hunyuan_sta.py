"""Sliding-tile attention inside the HunyuanVideo DiT: the joint [video; text] attention of the dual- and
single-stream blocks with the sliding tile on the video tokens and the (padded) text joined in full. Equal to the
dense DiT with the full window, and to the dense DiT under the STA token mask; per-layer windows as scanned data
(one scan per block kind); FastVideo's layer numbering for mask strategies; meshes; clear errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastvideo_jax.attention.sliding_tile_strategy import load_mask_strategy
from fastvideo_jax.configs.models.dits.hunyuanvideo import HUNYUAN_PRESETS, HunyuanVideoConfig, hunyuan_preset
from fastvideo_jax.models.dits import hunyuan_blocks
from fastvideo_jax.models.dits.hunyuanvideo import HunyuanVideoTransformer3DModel
from fastvideo_jax.models.layers import compiled
from fastvideo_jax.models.loader.component_loader import TransformerLoader, build_abstract
from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh
from fastvideo_jax.testing import write_random_hunyuan_dit
from fastvideo_jax.testing.tiny_checkpoints import random_state
from tests.oracles import errors, sta_token_mask
from tests.test_hunyuan_dit import _placed

TILE = (1, 2, 2)  # small tiles so the tiny latent grid (3, 3, 5) spans several tiles (with ragged edges)
SMALL, WIDE = (1, 1, 1), (3, 1, 2)
LAYERS = 4  # tiny preset: 2 dual-stream + 2 single-stream blocks


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return write_random_hunyuan_dit(tmp_path_factory.mktemp("hy_sta") / "transformer", seed=7)


def _inputs(seed=0, batch=2, frames=3, height=6, width=10, text_lens=(4, 7), text_len=7):
    """Latents (3, 3, 5) patches; row 0 has 3 padded text tokens, row 1 none."""
    rng = np.random.default_rng(seed)
    tiny = hunyuan_preset("tiny")
    return dict(
        hidden_states=jnp.asarray(rng.standard_normal((batch, tiny.in_channels, frames, height, width)), jnp.float32),
        timestep=jnp.asarray([700.0, 20.0][:batch]),
        encoder_hidden_states=jnp.asarray(rng.standard_normal((batch, text_len, tiny.text_embed_dim)), jnp.float32),
        encoder_attention_mask=jnp.asarray(np.arange(text_len)[None, :] < np.asarray(text_lens)[:, None]),
        pooled_projections=jnp.asarray(rng.standard_normal((batch, tiny.pooled_projection_dim)), jnp.float32),
        guidance=jnp.asarray([6000.0, 1000.0][:batch]),
    )


def _load(d, **overrides):
    return TransformerLoader().load(d, precision="fp32", **overrides)


def _sta(d, **overrides):
    return _load(d, self_attention_backend="sliding_tile", sta_tile=TILE, **overrides)


def _call(model, inputs, **kwargs):
    return np.asarray(model(**inputs, **kwargs))


@pytest.fixture(scope="module")
def inputs():
    return _inputs()


@pytest.fixture(scope="module")
def dense_out(dit_dir, inputs):
    return _call(_load(dit_dir), inputs)


def _masked_dense(q, k, v, *, grid, palette, index, tile, text_len, text_mask):
    """Dense softmax attention over [video; text] under a mask built here: video query -> video key by the STA
    token mask of its head's window; any query -> text key iff that text token is real; text query -> every
    video key. The window set is chosen at run time like STA's."""
    n_video = int(np.prod(grid))
    masks = []
    for windows in palette:
        heads = []
        for w in windows:
            m = np.ones((n_video + text_len,) * 2, bool)
            m[:n_video, :n_video] = sta_token_mask(grid, tile, w)
            heads.append(m)
        masks.append(np.stack(heads))
    mask = jnp.asarray(np.stack(masks))[index][None]  # (1, N, L, L)
    keys = jnp.concatenate([jnp.ones((q.shape[0], n_video), bool), text_mask], axis=1)  # (B, L)
    mask = mask & keys[:, None, None, :]
    s = jnp.einsum("bqne,bkne->bnqk", q, k) * q.shape[-1] ** -0.5
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    return jnp.einsum("bnqk,bkne->bqne", p, v)


def test_full_window_equals_dense(dit_dir, inputs, dense_out):
    err, rel = errors(_call(_sta(dit_dir), inputs), dense_out)
    assert err < 1e-5, f"STA (full window, padded text rows) vs dense: max-abs {err:.3e}, relative {rel:.3e}"


def test_attention_backend_name_selects_it(dit_dir, inputs, dense_out):
    by_name = _load(dit_dir, attention_backend="SLIDING_TILE_ATTN", sta_tile=TILE, sta_window=SMALL)
    by_knob = _sta(dit_dir, sta_window=SMALL)
    assert by_name.sta_plan == by_knob.sta_plan and by_name.sta_plan.num_layers == LAYERS
    out = _call(by_name, inputs)
    assert errors(out, _call(by_knob, inputs))[0] == 0.0
    assert errors(out, dense_out)[0] > 1e-3, "a (1, 1, 1) window must restrict attention"


def test_small_windows_equal_dense_under_the_token_mask(dit_dir, inputs, dense_out, monkeypatch):
    # a window per head on dual layer 0, one window on dual 1, full on single 0, another per-head set on single 1
    windows = ((SMALL, (3, 3, 1)), WIDE, None, ((1, 3, 3), SMALL))
    ours = _call(_sta(dit_dir, sta_layer_windows=windows), inputs)
    # The same model with the sliding-tile op replaced by dense attention under the mask built in this test. The
    # structure is unchanged, so the jit cache must be cleared around the swap.
    monkeypatch.setattr(hunyuan_blocks, "sliding_tile_attention", _masked_dense)
    compiled._pure_call.clear_cache()
    try:
        oracle = _call(_sta(dit_dir, sta_layer_windows=windows), inputs)
    finally:
        compiled._pure_call.clear_cache()
    err, rel = errors(ours, oracle)
    assert err < 1e-5, f"STA DiT vs dense DiT under the STA token mask: max-abs {err:.3e}, relative {rel:.3e}"
    assert errors(oracle, dense_out)[0] > 1e-3, "the windows must actually restrict attention"


def test_padded_text_tokens_are_never_attended(dit_dir, inputs):
    model = _sta(dit_dir, sta_window=SMALL)
    base = _call(model, inputs)
    text = np.asarray(inputs["encoder_hidden_states"]).copy()
    text[0, 4:] += 5.0  # row 0's padding
    np.testing.assert_allclose(_call(model, dict(inputs, encoder_hidden_states=jnp.asarray(text))), base,
                               rtol=0, atol=1e-5)
    text[0, 3] += 5.0  # a real token: must change the output (the check can fail)
    assert np.abs(_call(model, dict(inputs, encoder_hidden_states=jnp.asarray(text)))[0] - base[0]).max() > 1e-3


def test_per_layer_windows(dit_dir, inputs, dense_out):
    uniform = _call(_sta(dit_dir, sta_window=SMALL), inputs)
    assert errors(_call(_sta(dit_dir, sta_layer_windows=(SMALL,) * LAYERS), inputs), uniform)[0] < 1e-6
    assert errors(_call(_sta(dit_dir, sta_layer_windows=((9, 9, 9), None, None, (9, 9, 9))), inputs),
                  dense_out)[0] < 1e-5
    # only the last single-stream layer windowed: differs from both (so the single blocks do read their ids)
    last = _call(_sta(dit_dir, sta_layer_windows=(None, None, None, SMALL)), inputs)
    assert min(errors(last, dense_out)[0], errors(last, uniform)[0]) > 1e-4


def _top_level_scans(jaxpr) -> int:
    """Scans not nested in another scan (the layer loops; kernels' inner maps are not counted)."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            n += 1
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    n += _top_level_scans(sub)
    return n


def test_different_layer_windows_run_as_one_scan_per_block_kind(inputs):
    arch = dataclasses.replace(hunyuan_preset("tiny"), num_layers=3, num_single_layers=3)
    config = HunyuanVideoConfig(arch_config=arch, precision="fp32", self_attention_backend="sliding_tile",
                                sta_tile=TILE, sta_layer_windows=(SMALL, WIDE, None, WIDE, None, SMALL))
    graphdef, abstract = build_abstract(HunyuanVideoTransformer3DModel, config)
    model = nnx.merge(graphdef, random_state(abstract, 0))
    scans = _top_level_scans(jax.make_jaxpr(lambda kw: model(**kw))(inputs).jaxpr)
    # the text refiner's scan, the dual-stream scan, the single-stream scan
    assert scans == 3, f"6 layers with 3 different windows compiled as {scans} scans (refiner + 2 expected)"


def test_runtime_layer_windows_do_not_recompile(dit_dir, inputs, count_compiles):
    model = _sta(dit_dir, sta_layer_windows=(SMALL, WIDE, WIDE, SMALL))
    palette = model.sta_plan.palette
    swapped = jnp.asarray([1, 0, 0, 1], jnp.int32)
    _call(model, inputs, sta_layer_ids=jnp.asarray([0, 1, 1, 0], jnp.int32), sta_palette=palette)
    with count_compiles() as compiles:
        out = _call(model, inputs, sta_layer_ids=swapped, sta_palette=palette)
    assert compiles[0] == 0, f"new per-layer windows (same palette) compiled {compiles[0]} times"
    static = _call(_sta(dit_dir, sta_layer_windows=(WIDE, SMALL, SMALL, WIDE)), inputs)
    assert errors(out, static)[0] < 1e-6


def test_mask_strategy_counts_dual_then_single_layers(dit_dir, inputs):
    """FastVideo numbers Hunyuan's STA layers double_blocks 0..n-1 then single_blocks n..n+m-1."""
    strategy = load_mask_strategy({f"{s}_{layer}_{h}": [1 + (s + layer) % 2, 1, 1 + h]
                                   for s in range(2) for layer in range(LAYERS) for h in range(2)})
    palette, ids = strategy.palette_schedule(2, LAYERS, 2)
    model = _sta(dit_dir)
    step1 = _call(model, inputs, sta_layer_ids=ids[1], sta_palette=palette)
    static = _call(_sta(dit_dir, sta_layer_windows=strategy.layer_windows(1)), inputs)
    assert errors(step1, static)[0] < 1e-6


def test_denoising_stage_takes_every_layer_from_the_strategy(dit_dir, inputs):
    """The pipeline's denoising stage reads the plan's layer count (dual + single), not ``num_layers``."""
    from fastvideo_jax.pipelines.stages import DenoisingStage, TimestepPreparationStage
    from fastvideo_jax.schedulers.flow_match_euler import FlowMatchEulerScheduler

    strategy = load_mask_strategy({f"{s}_{layer}_{h}": [1 + (s + layer) % 2, 1, 1 + h]
                                   for s in range(2) for layer in range(LAYERS) for h in range(2)})
    scheduler = FlowMatchEulerScheduler(shift=7.0)
    tables = TimestepPreparationStage(scheduler).tables(2)
    cond = {k: v for k, v in inputs.items() if k not in ("hidden_states", "timestep")}
    stage = DenoisingStage(_sta(dit_dir), scheduler, mask_strategy=strategy, progress=False)
    ours = np.asarray(stage.denoise(inputs["hidden_states"], cond, tables, 2, 1.0, do_cfg=False))
    latents = inputs["hidden_states"]
    state = scheduler.init_state(tables, latents.shape)
    for step in range(2):
        model = _sta(dit_dir, sta_layer_windows=strategy.layer_windows(step))
        t = scheduler.timestep(tables, state)
        v = model(hidden_states=latents, timestep=jnp.broadcast_to(t, (2,)), **cond)
        latents, state = scheduler.step(tables, state, v, latents)
    err, rel = errors(ours, latents)
    assert err < 1e-5, f"denoising with a mask strategy vs per-step static windows: {err:.3e} ({rel:.3e})"


# 3x3x5 = 45 video tokens: sequence=2 does not divide them; joint Ulysses drops the padding before the op, so
# sliding-tile attention sees the whole grid on every device (no error, unlike Wan's padded self-attention).
@pytest.mark.parametrize("mesh", [MeshConfig(sequence=2), MeshConfig(data=2, sequence=2)])
def test_sequence_parallel_equals_one_device(dit_dir, inputs, mesh):
    model = _sta(dit_dir, sta_layer_windows=((SMALL, WIDE), WIDE, None, (WIDE, SMALL)))
    ref = _call(model, inputs)
    _, rel = errors(_call(_placed(model, make_mesh(mesh)), inputs), ref)
    assert rel <= 1e-5, mesh


def test_tensor_times_sequence_heads_get_their_windows(tmp_path):
    """4 heads over tensor=2 x sequence=2, a different window per head: each device must use its heads' windows."""
    from fastvideo_jax.testing.tiny_checkpoints import write_random_component

    d = write_random_component(tmp_path / "transformer", HunyuanVideoTransformer3DModel,
                               "HunyuanVideoTransformer3DModel", {**HUNYUAN_PRESETS["tiny"], "num_attention_heads": 4},
                               seed=6)
    heads = (SMALL, WIDE, (1, 3, 1), (3, 3, 3))
    model = _sta(d, sta_layer_windows=(heads, heads[::-1], SMALL, heads))
    inputs = _inputs(3)
    ref = _call(model, inputs)
    _, rel = errors(_call(_placed(model, make_mesh(MeshConfig(tensor=2, sequence=2))), inputs), ref)
    assert rel <= 1e-5


def test_bad_sta_configs_are_clear(dit_dir, inputs):
    with pytest.raises(ValueError, match="3 entries for 4 layers"):
        _sta(dit_dir, sta_layer_windows=(SMALL,) * 3)
    with pytest.raises(ValueError, match="self_attention_backend"):
        _load(dit_dir, self_attention_backend="sparse-ish")
    with pytest.raises(ValueError, match="sta_tile"):
        _load(dit_dir, self_attention_backend="sliding_tile", sta_tile="big")
    with pytest.raises(ValueError, match="got 3 per-head windows for 2 heads"):
        _sta(dit_dir, sta_window=(SMALL, SMALL, SMALL))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        _call(_sta(dit_dir), inputs, sta_layer_ids=np.asarray([0, 0], np.int32))
    with pytest.raises(ValueError, match="must index"):
        _call(_sta(dit_dir), inputs, sta_layer_ids=np.asarray([0, 0, 0, 3], np.int32))
    with pytest.raises(ValueError, match="sliding-tile model"):
        _call(_load(dit_dir), inputs, sta_layer_ids=np.asarray([0, 0, 0, 0], np.int32))
