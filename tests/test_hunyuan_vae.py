"""Parity of the NNX HunyuanVideo VAE with diffusers' ``AutoencoderKLHunyuanVideo`` (PLAYBOOK step 5).

A tiny diffusers model (3 stages: the fewest that compress 4x8x8; conv shortcuts, spatial and temporal
resampling, the frame-causal mid-block attention) gets noise on every parameter (GroupNorm scales included), is
saved with save_pretrained and loaded through ``VAELoader``. Encode and decode are compared untiled on 1/5/9/13
frames and batch 2, then with diffusers' temporal tiling, spatial tiling and both, at tile sizes small enough
that they engage (each tiled test also checks that tiling changed diffusers' result by far more than the
tolerance, so it cannot pass with tiling off). Shapes are shared between tests: compiling dominates.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from tests.oracles import error_report, normal_latents, noised_torch_vae, uniform_video  # noqa: E402

from fastvideo_jax.configs.models.vaes.hunyuanvae import HUNYUAN_VAE_PRESETS, HunyuanVAEArchConfig, HunyuanVAEConfig  # noqa: E402
from fastvideo_jax.errors import UserError  # noqa: E402
from fastvideo_jax.models.loader.component_loader import VAELoader, build_abstract, export_component  # noqa: E402
from fastvideo_jax.models.vaes.hunyuanvae import AutoencoderKLHunyuanVideo  # noqa: E402
from fastvideo_jax.models.vaes.parallel_decode import decode_on_mesh  # noqa: E402
from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh  # noqa: E402
from fastvideo_jax.testing.tiny_checkpoints import random_state  # noqa: E402

TOL = 1e-4  # fp32, whole model
SIZE = (16, 24)  # latents 2x3
Z = 16  # latent channels of the tiny preset
# Spatial tiles of 16 px (2 latents) at a stride of 8 (1 latent); temporal tiles of 8 (+1) frames (2 (+1)
# latents) at a stride of 4 (1 latent): 9 and 13 frames engage temporal tiling, 1 and 5 do not.
TILES = dict(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=8,
             tile_sample_stride_width=8, tile_sample_min_num_frames=8, tile_sample_stride_num_frames=4)
FAR = 100 * TOL  # how much tiling must change diffusers' output for a tiled comparison to mean anything








@pytest.fixture(scope="module")
def torch_vae():
    return noised_torch_vae(diffusers.AutoencoderKLHunyuanVideo, HUNYUAN_VAE_PRESETS["tiny"])


@pytest.fixture(scope="module")
def ckpt_dir(torch_vae, tmp_path_factory):
    path = tmp_path_factory.mktemp("hunyuan_vae")
    torch_vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae(ckpt_dir):
    return VAELoader().load(ckpt_dir, precision="fp32", **TILES)


@contextlib.contextmanager
def _mode(model, *, tiled: bool, framewise: bool):
    """diffusers' model with our test tiles, spatial tiling ``tiled`` and temporal tiling ``framewise``."""
    names = (*TILES, "use_tiling", "use_framewise_encoding", "use_framewise_decoding")
    saved = {k: getattr(model, k) for k in names}
    for k, v in TILES.items():
        setattr(model, k, v)
    model.use_tiling, model.use_framewise_encoding, model.use_framewise_decoding = tiled, framewise, framewise
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(model, k, v)


def _ref_encode(model, x, *, tiled: bool, framewise: bool):
    with _mode(model, tiled=tiled, framewise=framewise), torch.no_grad():
        dist = model.encode(torch.from_numpy(x)).latent_dist
    return dist.mean.numpy(), dist.logvar.numpy()


def _ref_decode(model, z, *, tiled: bool, framewise: bool):
    with _mode(model, tiled=tiled, framewise=framewise), torch.no_grad():
        return model.decode(torch.from_numpy(z)).sample.numpy()


def _check_encode(torch_vae, vae, x, *, tiled: bool, framewise: bool, what: str, changes: bool = True):
    mean_ref, logvar_ref = _ref_encode(torch_vae, x, tiled=tiled, framewise=framewise)
    mean, logvar = vae.encode_distribution(x, tiled=tiled, framewise=framewise)
    err, msg = error_report(mean, mean_ref)
    assert err < TOL, f"encode mean, {what}: {msg}"
    err, msg = error_report(logvar, logvar_ref)
    assert err < TOL, f"encode logvar, {what}: {msg}"
    if (tiled or framewise) and changes:  # the tiling must matter, or this comparison proves nothing about it
        plain, _ = _ref_encode(torch_vae, x, tiled=False, framewise=False)
        assert error_report(mean_ref, plain)[0] > FAR, f"{what}: diffusers' tiling did not change the encoding"


def _check_decode(torch_vae, vae, z, *, tiled: bool, framewise: bool, what: str):
    ref = _ref_decode(torch_vae, z, tiled=tiled, framewise=framewise)
    err, msg = error_report(vae.decode(z, tiled=tiled, framewise=framewise), ref)
    assert err < TOL, f"decode, {what}: {msg}"
    if tiled or framewise:
        plain = _ref_decode(torch_vae, z, tiled=False, framewise=False)
        assert error_report(ref, plain)[0] > FAR, f"{what}: diffusers' tiling did not change the decoded video"


@pytest.mark.parametrize("frames", [1, 5, 9, 13])
def test_encode_matches_diffusers(torch_vae, vae, frames):
    x = uniform_video(frames, (2, 3, frames, *SIZE))
    _check_encode(torch_vae, vae, x, tiled=False, framewise=False, what=f"{frames} frames, untiled")


@pytest.mark.parametrize("frames", [1, 5, 9, 13])
def test_decode_matches_diffusers(torch_vae, vae, frames):
    z = normal_latents(frames, (2, Z, (frames - 1) // 4 + 1, SIZE[0] // 8, SIZE[1] // 8))
    _check_decode(torch_vae, vae, z, tiled=False, framewise=False, what=f"{frames} frames, untiled")


@pytest.mark.parametrize("frames", [9, 13])
def test_temporal_tiling_matches_diffusers(torch_vae, vae, frames):
    # Temporal tiles of these clips have the frame counts of the untiled tests above (no new compilations). At 9
    # frames diffusers' tiled encoding IS the untiled one (the first tile is the whole clip and a one-frame blend
    # keeps the first tile's frame), so only 13 frames can show that encode tiling happened.
    x = uniform_video(frames + 100, (2, 3, frames, *SIZE))
    _check_encode(torch_vae, vae, x, tiled=False, framewise=True, what=f"{frames} frames, temporal tiles",
                  changes=frames == 13)
    z = normal_latents(frames + 100, (2, Z, (frames - 1) // 4 + 1, SIZE[0] // 8, SIZE[1] // 8))
    _check_decode(torch_vae, vae, z, tiled=False, framewise=True, what=f"{frames} frames, temporal tiles")


def test_spatial_tiling_matches_diffusers(torch_vae, vae):
    # Decode: 2x3 latents in tiles of 2x2 at a stride of 1x1, a 2x3 grid blended both ways with edge tiles.
    # Encode: 8x24 px, one row of three 8x16 / 8x8 tiles blended across. 5 frames: not temporally tiled.
    x = uniform_video(7, (1, 3, 5, 8, 24))
    _check_encode(torch_vae, vae, x, tiled=True, framewise=False, what="5 frames, spatial tiles")
    z = normal_latents(7, (1, Z, 2, SIZE[0] // 8, SIZE[1] // 8))
    _check_decode(torch_vae, vae, z, tiled=True, framewise=False, what="5 frames, spatial tiles")


def test_spatial_and_temporal_tiling_matches_diffusers(torch_vae, vae):
    # 13 frames: temporal tiles, each split into the spatial tiles above (diffusers' nesting). The last temporal
    # tiles have the shapes of the spatial test's (fewer compilations).
    x = uniform_video(13, (1, 3, 13, 8, 24))
    _check_encode(torch_vae, vae, x, tiled=True, framewise=True, what="13 frames, temporal + spatial tiles")
    z = normal_latents(13, (1, Z, 4, SIZE[0] // 8, SIZE[1] // 8))
    _check_decode(torch_vae, vae, z, tiled=True, framewise=True, what="13 frames, temporal + spatial tiles")


def test_bf16_decode_as_accurate_as_diffusers_bf16(torch_vae, ckpt_dir):
    # bf16 has 8 mantissa bits; the justified bound is diffusers' own bf16 error against fp32 (both keep the
    # GroupNorm statistics in fp32).
    z = normal_latents(3, (1, Z, 2, SIZE[0] // 8, SIZE[1] // 8))
    ref = _ref_decode(torch_vae, z, tiled=False, framewise=False)
    with torch.no_grad():
        tb16 = diffusers.AutoencoderKLHunyuanVideo.from_pretrained(ckpt_dir, torch_dtype=torch.bfloat16).eval()
        ref16 = tb16.decode(torch.from_numpy(z).bfloat16()).sample.float().numpy()
    ours = VAELoader().load(ckpt_dir, precision="bf16", load_encoder=False)
    got = np.asarray(ours.decode(z).astype(np.float32))
    ours_err, torch_err = np.abs(got - ref).mean(), np.abs(ref16 - ref).mean()
    assert ours_err <= 1.5 * torch_err, f"bf16 mean-abs error {ours_err:.3e}, diffusers bf16 {torch_err:.3e}"


def test_second_call_does_not_compile(vae, count_compiles):
    """Eager use: every temporal tile is one cached compiled call, so decoding the same shape again (tiles
    included) compiles nothing."""
    z = normal_latents(4, (2, Z, 3, SIZE[0] // 8, SIZE[1] // 8))
    first = np.asarray(vae.decode(z, framewise=True))
    with count_compiles() as n:
        again = np.asarray(vae.decode(z, framewise=True))
    assert n[0] == 0, f"{n[0]} compilations on the second same-shape decode"
    np.testing.assert_array_equal(again, first)


def test_defaults_follow_diffusers(torch_vae):
    """Our config's tiling defaults are diffusers' (temporal tiling on, spatial off, 256/192 px, 16/12 frames);
    the tiny preset is what diffusers builds from it; the scaling factor is the checkpoint's."""
    fresh = diffusers.AutoencoderKLHunyuanVideo(**torch_vae.config)
    ours = HunyuanVAEConfig()
    for name in ("use_tiling", "use_framewise_encoding", "use_framewise_decoding", "tile_sample_min_height",
                 "tile_sample_min_width", "tile_sample_min_num_frames", "tile_sample_stride_height",
                 "tile_sample_stride_width", "tile_sample_stride_num_frames"):
        assert getattr(ours, name) == getattr(fresh, name), name
    assert HunyuanVAEArchConfig().scaling_factor == fresh.config.scaling_factor == 0.476986


def test_latent_scaling_is_diffusers_pipeline(vae):
    z = normal_latents(0, (1, Z, 2, 2, 3))
    np.testing.assert_allclose(np.asarray(vae.denormalize_latents(z)), z / 0.476986, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(vae.normalize_latents(vae.denormalize_latents(z))), z, rtol=1e-6)


def test_export_round_trips(torch_vae, vae):
    exported = export_component(vae)
    state = {k: v.numpy() for k, v in torch_vae.state_dict().items()}
    assert sorted(exported) == sorted(state)
    for k, v in state.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_bad_input_is_refused_before_work(vae):
    with pytest.raises(UserError, match="frame count must be 1 \\+ 4k"):
        vae.encode(np.zeros((1, 3, 4, 16, 16), np.float32))
    with pytest.raises(UserError, match="expected video \\(B, 3, F, H, W\\)"):
        vae.encode(np.zeros((1, 4, 5, 16, 16), np.float32))
    with pytest.raises(UserError, match="expected latents \\(B, 16, T, h, w\\)"):
        vae.decode(np.zeros((1, 4, 2, 2, 2), np.float32))
    with pytest.raises(ValueError, match="tile_sample_min_num_frames=10"):
        vae.config.update_model_config(tile_sample_min_num_frames=10)
    with pytest.raises(ValueError, match="2 stages compress 2x in time and 4x in space"):
        HunyuanVAEArchConfig().update_model_arch({"block_out_channels": [8, 16], "down_block_types":
                                                  ["HunyuanVideoDownBlock3D"] * 2, "up_block_types":
                                                  ["HunyuanVideoUpBlock3D"] * 2})


def test_decode_on_mesh_equals_one_device():
    """The decoder split over data=2 x sequence=4 (rows of every activation, halos, GroupNorm statistics and the
    mid-block attention across shards): the one-device decode."""
    config = AutoencoderKLHunyuanVideo.config_class().update_model_arch(HUNYUAN_VAE_PRESETS["tiny"])
    graph, abstract = build_abstract(AutoencoderKLHunyuanVideo, config.update_model_config(load_encoder=False))
    state = random_state(abstract, 7)
    mesh = make_mesh(MeshConfig(data=2, sequence=4))
    single = nnx.merge(graph, state)
    on_mesh = nnx.merge(graph, jax.device_put(state, NamedSharding(mesh, PartitionSpec())))
    z = normal_latents(2, (1, Z, 2, 4, 4))
    reference = np.asarray(single.decode(z))
    video = decode_on_mesh(on_mesh, z, mesh)
    assert len({str(s.index) for s in video.addressable_shards}) > 1, f"output not split: {video.sharding}"
    err, msg = error_report(video, reference)
    assert err < 1e-5, f"decode split over data=2 x sequence=4 vs one device: {msg}"


def test_random_checkpoint_is_diffusers_layout(tmp_path):
    """``write_random_hunyuan_vae`` (tiny pipelines) writes what diffusers loads with every tensor matched, and
    diffusers holds exactly our weights."""
    from fastvideo_jax.testing import write_random_hunyuan_vae

    path = write_random_hunyuan_vae(tmp_path / "vae", seed=3)
    ref, info = diffusers.AutoencoderKLHunyuanVideo.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    ours = export_component(VAELoader().load(path))
    for k, v in ref.state_dict().items():
        np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)
