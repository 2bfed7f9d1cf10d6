"""Sliding-tile attention inside the Wan DiT: equal to dense attention under the STA token mask, per-layer
windows in one scan, runtime window choice without recompiling, padding-aware tile choice."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastvideo_jax.attention.sliding_tile_mask import TileGeometry, choose_tile, normalize_windows
from fastvideo_jax.attention.sliding_tile_strategy import load_mask_strategy
from fastvideo_jax.configs.models.dits.wanvideo import WanVideoConfig, wan_preset
from fastvideo_jax.models.dits import wanvideo
from fastvideo_jax.models.dits.wanvideo import WanTransformer3DModel
from fastvideo_jax.models.layers import compiled
from fastvideo_jax.models.loader.component_loader import TransformerLoader, build_abstract
from fastvideo_jax.testing import write_random_dit
from fastvideo_jax.testing.tiny_checkpoints import random_state
from tests.oracles import dit_call, errors, sta_token_mask

TILE = (1, 2, 2)  # small tiles so the tiny latent grid (3, 3, 5) spans several tiles (with ragged edges)
SMALL, WIDE = (1, 1, 1), (3, 1, 2)


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return write_random_dit(tmp_path_factory.mktemp("sta") / "transformer", seed=4)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 16, 3, 6, 10)), jnp.float32)
    return x, jnp.asarray([700.0, 20.0]), jnp.asarray(rng.standard_normal((2, 7, 32)), jnp.float32)


def _load(d, **overrides):
    return TransformerLoader().load(d, precision="fp32", **overrides)


def _sta(d, **overrides):
    return _load(d, self_attention_backend="sliding_tile", sta_tile=TILE, **overrides)


@pytest.fixture(scope="module")
def dense_out(dit_dir, inputs):
    return np.asarray(dit_call(_load(dit_dir), *inputs))


def _masked_dense(q, k, v, *, grid, palette, index, tile):
    """Dense softmax attention under the test's token mask, the window set chosen at run time like STA's."""
    masks = np.stack([np.stack([sta_token_mask(grid, tile, w) for w in windows]) for windows in palette])
    mask = jnp.asarray(masks)[index][None]  # (1, N, L, L)
    s = jnp.einsum("bqne,bkne->bnqk", q, k) * q.shape[-1] ** -0.5
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    return jnp.einsum("bnqk,bkne->bqne", p, v)


def test_token_mask_matches_fastvideo_clamping():
    # 1 x 1 x 5 tiles, window 3 along w: edge tiles see their 3 nearest, clamped inside the grid.
    m = sta_token_mask((1, 1, 5), (1, 1, 1), (1, 1, 3))
    assert m[0].tolist() == [True, True, True, False, False]
    assert m[2].tolist() == [False, True, True, True, False]
    assert m[4].tolist() == [False, False, True, True, True]


def test_sta_dit_equals_dense_dit_under_thesta_token_mask(dit_dir, inputs, dense_out, monkeypatch):
    windows = (((1, 1, 1), (3, 3, 1)), WIDE)  # layer 0: a window per head; layer 1: one window for both
    ours = np.asarray(dit_call(_sta(dit_dir, sta_layer_windows=windows), *inputs))
    # The same model with its sliding-tile attention replaced by dense attention under the token mask. The
    # structure is unchanged, so the jit cache must be cleared around the swap.
    monkeypatch.setattr(wanvideo, "sliding_tile_attention", _masked_dense)
    compiled._pure_call.clear_cache()
    try:
        oracle = np.asarray(dit_call(_sta(dit_dir, sta_layer_windows=windows), *inputs))
    finally:
        compiled._pure_call.clear_cache()
    err, rel = errors(ours, oracle)
    assert err < 1e-4, f"STA DiT vs dense DiT under the STA token mask: max-abs {err:.3e}, relative {rel:.3e}"
    assert errors(oracle, dense_out)[0] > 1e-3, "the windows must actually restrict attention"


def test_sta_full_window_on_all_layers_equals_dense(dit_dir, inputs, dense_out):
    err, rel = errors(dit_call(_sta(dit_dir), *inputs), dense_out)
    assert err < 1e-5, f"STA (full window) vs dense: max-abs {err:.3e}, relative {rel:.3e}"


def test_per_layer_windows(dit_dir, inputs, dense_out):
    uniform = np.asarray(dit_call(_sta(dit_dir, sta_window=SMALL), *inputs))
    assert errors(dit_call(_sta(dit_dir, sta_layer_windows=(SMALL, SMALL)), *inputs), uniform)[0] < 1e-6
    assert errors(dit_call(_sta(dit_dir, sta_layer_windows=((9, 9, 9), None)), *inputs), dense_out)[0] < 1e-5
    mixed = dit_call(_sta(dit_dir, sta_layer_windows=(SMALL, None)), *inputs)
    assert min(errors(mixed, dense_out)[0], errors(mixed, uniform)[0]) > 1e-4, "layer 1 full, layer 0 STA"


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


def test_three_different_layer_windows_run_as_one_scan(inputs):
    arch = dataclasses.replace(wan_preset("tiny"), num_layers=3)
    config = WanVideoConfig(arch_config=arch, precision="fp32", self_attention_backend="sliding_tile",
                            sta_tile=TILE, sta_layer_windows=(SMALL, WIDE, None))
    graphdef, abstract = build_abstract(WanTransformer3DModel, config)
    model = nnx.merge(graphdef, random_state(abstract, 0))
    scans = _top_level_scans(jax.make_jaxpr(lambda *a: dit_call(model, *a))(*inputs).jaxpr)
    assert scans == 1, f"3 layers with 3 different windows compiled as {scans} layer scans"


def test_runtime_layer_windows_do_not_recompile(dit_dir, inputs, count_compiles):
    model = _sta(dit_dir, sta_layer_windows=(SMALL, WIDE))
    palette = model.sta_plan.palette
    swapped_ids = jnp.asarray([1, 0], jnp.int32)
    dit_call(model, *inputs, sta_layer_ids=jnp.asarray([0, 1], jnp.int32), sta_palette=palette)
    with count_compiles() as compiles:
        swapped = np.asarray(dit_call(model, *inputs, sta_layer_ids=swapped_ids, sta_palette=palette))
    assert compiles[0] == 0, f"new per-layer windows (same palette) compiled {compiles[0]} times"
    static = np.asarray(dit_call(_sta(dit_dir, sta_layer_windows=(WIDE, SMALL)), *inputs))
    assert errors(swapped, static)[0] < 1e-6


def test_mask_strategy_schedule_feeds_the_dit(dit_dir, inputs):
    strategy = load_mask_strategy({f"{s}_{layer}_{h}": [1 + (s + layer) % 2, 1, 1 + h]
                                   for s in range(3) for layer in range(2) for h in range(2)})
    palette, ids = strategy.palette_schedule(3, 2, 2)
    assert ids.shape == (3, 2) and len(palette) == 2
    assert palette[ids[1, 0]] == normalize_windows(((2, 1, 1), (2, 1, 2)), 2)
    model = _sta(dit_dir)
    step1 = dit_call(model, *inputs, sta_layer_ids=ids[1], sta_palette=palette)
    static = dit_call(_sta(dit_dir, sta_layer_windows=strategy.layer_windows(1)), *inputs)
    assert errors(step1, static)[0] < 1e-6
    with pytest.raises(KeyError, match="covers 3 denoising steps"):
        strategy.palette_schedule(4, 2, 2)


def test_auto_tile_cuts_480p_padding():
    grid = (21, 30, 52)  # 81 frames at 480x832 after the VAE and the (1, 2, 2) patch
    assert TileGeometry(grid, (6, 8, 8)).padded_video_len == 43008
    for align in (1, 128):
        tile = choose_tile(grid, align=align)
        padded = TileGeometry(grid, tile, 0, align).padded_video_len
        assert padded <= 33792, f"align {align}: tile {tile} pads {math.prod(grid)} tokens to {padded}"
    assert TileGeometry(grid, choose_tile(grid), 0, 1).padded_video_len == math.prod(grid)  # no padding at all


def test_auto_tile_in_the_dit(dit_dir, inputs, dense_out):
    model = _load(dit_dir, self_attention_backend="sliding_tile", sta_tile="auto")
    assert errors(dit_call(model, *inputs), dense_out)[0] < 1e-5  # full window whatever the tile


def test_bad_sta_configs_are_clear(dit_dir, inputs):
    with pytest.raises(ValueError, match="2 layers"):
        _load(dit_dir, self_attention_backend="sliding_tile", sta_layer_windows=((1, 1, 1),))
    with pytest.raises(ValueError, match="self_attention_backend"):
        _load(dit_dir, self_attention_backend="sparse-ish")
    with pytest.raises(ValueError, match="must index"):
        dit_call(_sta(dit_dir), *inputs, sta_layer_ids=np.asarray([0, 3], np.int32))
    with pytest.raises(ValueError, match="sliding-tile model"):
        dit_call(_load(dit_dir), *inputs, sta_layer_ids=np.asarray([0, 0], np.int32))


class _Denoiser:
    """The pipeline's denoising stage on its own (no text encoder or VAE), driven as the pipeline drives it."""

    def __init__(self, transformer, strategy=None):
        from fastvideo_jax.pipelines.stages import DenoisingStage, TimestepPreparationStage
        from fastvideo_jax.schedulers.flow_match_euler import FlowMatchEulerScheduler

        self.scheduler = FlowMatchEulerScheduler(shift=3.0)
        self.timesteps = TimestepPreparationStage(self.scheduler)
        self.stage = DenoisingStage(transformer, self.scheduler, mask_strategy=strategy, progress=False)

    def denoise(self, x, ctx, steps, guidance, progress=False):
        return self.stage.denoise(x, {"encoder_hidden_states": ctx}, self.timesteps.tables(steps), steps, guidance,
                                  do_cfg=False)


def _pipeline(transformer, strategy=None):
    return _Denoiser(transformer, strategy)


def test_pipeline_applies_per_step_windows_in_one_executable(dit_dir, inputs, monkeypatch):
    """Each denoising step uses its own windows from the strategy; the step is traced once for all of them."""
    import fastvideo_jax.pipelines.stages.denoising as denoising

    strategy = load_mask_strategy({f"{s}_{layer}_{h}": [(SMALL, WIDE, (9, 9, 9))[(s + layer) % 3][0], 1 + s % 2, 1 + h]
                                   for s in range(3) for layer in range(2) for h in range(2)})
    traces = []
    real = denoising._denoise_step

    def counting(*args, **kwargs):
        traces.append(kwargs.get("sta_palette"))
        return real(*args, **kwargs)

    monkeypatch.setattr(denoising, "_denoise_step", counting)
    x, _, ctx = inputs
    pipe = _pipeline(_sta(dit_dir), strategy)
    pipe.denoise(x, ctx, 1, 1.0, progress=False)
    ours = np.asarray(pipe.denoise(x, ctx, 3, 1.0, progress=False))
    palette = strategy.palette_schedule(3, 2, 2)[0]
    assert len(palette) == 5 and traces == [palette], f"traced {len(traces)} times for 4 steps, 5 window sets"
    # The same steps run by hand, each with a model whose config holds that step's windows.
    latents, sched = x, pipe.scheduler
    tables = sched.set_timesteps(3)
    state = sched.init_state(tables, x.shape)
    for step in range(3):
        model = _sta(dit_dir, sta_layer_windows=strategy.layer_windows(step))
        t = sched.timestep(tables, state)
        v = dit_call(model, latents, jnp.broadcast_to(t, (x.shape[0],)), ctx)
        latents, state = sched.step(tables, state, v, latents)
    err, rel = errors(ours, latents)
    assert err < 1e-5, f"pipeline with a mask strategy vs per-step static windows: {err:.3e} ({rel:.3e})"
    with pytest.raises(ValueError, match="covers 3 denoising steps"):
        pipe.denoise(x, ctx, 4, 1.0, progress=False)
    with pytest.raises(ValueError, match="sliding-tile transformer"):
        _pipeline(_load(dit_dir), strategy).denoise(x, ctx, 1, 1.0, progress=False)
