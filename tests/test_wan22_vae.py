"""Parity of the Wan2.2 VAE (48 channels, residual stages, 2x2 patchify) with diffusers' ``AutoencoderKLWan``.

A tiny diffusers model of the Wan2.2 layout (the ``tiny-wan2.2`` preset: both shortcuts, spatial + temporal
resampling, ``decoder_base_dim`` != ``base_dim``) gets noise on every parameter, is saved, and is loaded through
``VAELoader``; encode and decode are compared on 1, 5 and 9 frames, a non-square size with odd latent sides
(48x80 px = 3x5 latents) and batch 2, with and without diffusers' spatial tiling.
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from tests.oracles import error_report, normal_latents, noised_torch_vae, uniform_video  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from fastvideo_jax.configs.models.vaes.wanvae import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, WAN_VAE_PRESETS  # noqa: E402
from fastvideo_jax.models.loader.component_loader import VAELoader, build_abstract, export_component  # noqa: E402
from fastvideo_jax.models.vaes.parallel_decode import decode_on_mesh  # noqa: E402
from fastvideo_jax.models.vaes.wanvae import AutoencoderKLWan  # noqa: E402
from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh  # noqa: E402
from fastvideo_jax.testing.tiny_checkpoints import random_state, write_random_vae  # noqa: E402

TOL = 1e-4  # fp32, whole model
SIZE = (48, 80)  # non-square; latents 3x5 (odd both ways), patchified 24x40
LATENT = (SIZE[0] // 16, SIZE[1] // 16)
# Small tiles so that tiling engages. Decode: tiles of 2x3 latents at a stride of 1x2. Encode (diffusers counts
# these in patchified pixels): tiles of 16x24 at a stride of 8x16 over the patchified 24x40 (2x3 latents at a
# stride of 1x2; every tile side a multiple of the three 2x2 pools' 8).
TILES = dict(tile_sample_min_height=32, tile_sample_min_width=48, tile_sample_stride_height=16,
             tile_sample_stride_width=32)
ENCODE_TILES = dict(tile_sample_min_height=16, tile_sample_min_width=24, tile_sample_stride_height=8,
                    tile_sample_stride_width=16)
WEIGHTS = "diffusion_pytorch_model.safetensors"




def _torch_config(preset: str) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in WAN_VAE_PRESETS[preset].items()}


@pytest.fixture(scope="module")
def torch_vae():
    return noised_torch_vae(diffusers.AutoencoderKLWan, WAN_VAE_PRESETS["tiny-wan2.2"])


@pytest.fixture(scope="module")
def ckpt_dir(torch_vae, tmp_path_factory):
    path = tmp_path_factory.mktemp("wan22_vae")
    torch_vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae(ckpt_dir):
    return VAELoader().load(ckpt_dir, precision="fp32", **TILES)






def _tiled(torch_vae, tiles: dict):
    torch_vae.enable_tiling(**tiles)
    return torch_vae


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_matches_diffusers(torch_vae, vae, frames):
    x = uniform_video(frames, (2, 3, frames, *SIZE))
    with torch.no_grad():
        dist = torch_vae.encode(torch.from_numpy(x)).latent_dist
    mean, logvar = vae.encode_distribution(x, tiled=False)
    assert mean.shape == (2, 48, 1 + (frames - 1) // 4, *LATENT)
    err, msg = error_report(mean, dist.mean.numpy())
    assert err < TOL, f"encode mean, {frames} frames: {msg}"
    err, msg = error_report(logvar, dist.logvar.numpy())
    assert err < TOL, f"encode logvar, {frames} frames: {msg}"


@pytest.mark.parametrize("latent_frames", [1, 2, 3])
def test_decode_matches_diffusers(torch_vae, vae, latent_frames):
    z = normal_latents(latent_frames, (2, 48, latent_frames, *LATENT))
    with torch.no_grad():
        ref = torch_vae.decode(torch.from_numpy(z)).sample.numpy()
    assert ref.shape == (2, 3, 1 + 4 * (latent_frames - 1), *SIZE)
    err, msg = error_report(vae.decode(z, tiled=False), ref)
    assert err < TOL, f"decode, {latent_frames} latent frames -> {ref.shape[2]} frames: {msg}"


def test_tiled_encode_matches_diffusers(torch_vae, ckpt_dir, vae):
    x = uniform_video(19, (1, 3, 9, *SIZE))  # a 3x3 grid of tiles, blended both ways
    try:
        with torch.no_grad():
            ref = _tiled(torch_vae, ENCODE_TILES).encode(torch.from_numpy(x)).latent_dist.mean.numpy()
    finally:
        torch_vae.use_tiling = False
    tiled = VAELoader().load(ckpt_dir, precision="fp32", load_decoder=False, **ENCODE_TILES)
    err, msg = error_report(tiled.encode(x, tiled=True), ref)
    assert err < TOL, f"tiled encode (9 frames) vs diffusers tiled encode: {msg}"
    untiled = np.asarray(vae.encode(x, tiled=False))
    assert not np.allclose(ref, untiled, atol=1e-3), "tiles this small must change the result (tiling engaged)"


def test_tiled_decode_matches_diffusers(torch_vae, vae):
    z = normal_latents(17, (1, 48, 2, *LATENT))  # a 3x3 grid of tiles, blended both ways
    try:
        with torch.no_grad():
            ref = _tiled(torch_vae, TILES).decode(torch.from_numpy(z)).sample.numpy()
    finally:
        torch_vae.use_tiling = False
    err, msg = error_report(vae.decode(z, tiled=True), ref)
    assert err < TOL, f"tiled decode (2 latent frames) vs diffusers tiled decode: {msg}"


def test_without_feature_cache_same_result(ckpt_dir, vae):
    # All frames after the first in one chunk: the shortcuts pool / duplicate over many frames at once.
    one_chunk = VAELoader().load(ckpt_dir, precision="fp32", use_feature_cache=False)
    z = normal_latents(11, (1, 48, 3, *LATENT))
    err, msg = error_report(one_chunk.decode(z), vae.decode(z, tiled=False))
    assert err < 1e-5, f"decode with one chunk vs per-frame scan: {msg}"
    x = uniform_video(12, (1, 3, 9, *SIZE))
    err, msg = error_report(one_chunk.encode(x), vae.encode(x, tiled=False))
    assert err < 1e-5, f"encode with one chunk vs 4-frame scan: {msg}"


def test_bf16_decode_as_accurate_as_diffusers_bf16(torch_vae, ckpt_dir):
    # bf16 has 8 mantissa bits; the justified bound is diffusers' own bf16 error against fp32.
    z = normal_latents(3, (1, 48, 2, 2, 3))
    with torch.no_grad():
        ref = torch_vae.decode(torch.from_numpy(z)).sample.numpy()
        tb16 = diffusers.AutoencoderKLWan.from_pretrained(ckpt_dir, torch_dtype=torch.bfloat16).eval()
        ref16 = tb16.decode(torch.from_numpy(z).bfloat16()).sample.float().numpy()
    ours = VAELoader().load(ckpt_dir, precision="bf16", load_encoder=False)
    got = np.asarray(ours.decode(z), np.float32)
    ours_err, torch_err = np.abs(got - ref).mean(), np.abs(ref16 - ref).mean()
    assert ours_err <= 1.5 * torch_err, f"bf16 mean-abs error {ours_err:.3e}, diffusers bf16 {torch_err:.3e}"


def test_latent_normalisation_uses_checkpoint_stats(ckpt_dir, vae, tmp_path):
    assert vae.config.latents_mean == WAN22_LATENTS_MEAN and vae.config.latents_std == WAN22_LATENTS_STD
    z = normal_latents(5, (1, 48, 2, *LATENT))
    mean = np.asarray(WAN22_LATENTS_MEAN, np.float32)[None, :, None, None, None]
    std = np.asarray(WAN22_LATENTS_STD, np.float32)[None, :, None, None, None]
    np.testing.assert_allclose(vae.normalize_latents(z), (z - mean) / std, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vae.denormalize_latents(z), z * std + mean, rtol=1e-6, atol=1e-6)
    # Another checkpoint's statistics are read from its config.json, not a built-in table.
    raw = json.loads((ckpt_dir / "config.json").read_text())
    raw["latents_mean"], raw["latents_std"] = [0.5] * 48, [2.0] * 48
    (tmp_path / "config.json").write_text(json.dumps(raw))
    shutil.copy(ckpt_dir / WEIGHTS, tmp_path / WEIGHTS)
    other = VAELoader().load(tmp_path, precision="fp32", load_encoder=False, load_decoder=False)
    np.testing.assert_allclose(other.denormalize_latents(z), z * 2.0 + 0.5, rtol=1e-6, atol=1e-6)


def test_compression_attributes(vae):
    cfg = vae.config.arch_config
    assert (cfg.spatial_compression_ratio, cfg.temporal_compression_ratio, cfg.z_dim) == (16, 4, 48)
    assert (cfg.patch, cfg.video_channels, cfg.encode_size_multiple) == (2, 3, 16)


def test_export_round_trip(ckpt_dir, vae):
    exported = export_component(vae)
    original = load_file(str(ckpt_dir / WEIGHTS))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].shape == tensor.shape and np.array_equal(exported[name], tensor), name


def test_tiny_preset_writes_diffusers_layout(tmp_path):
    path = write_random_vae(tmp_path / "vae", "tiny-wan2.2", seed=3)
    written = {k: v.shape for k, v in load_file(str(path / WEIGHTS)).items()}
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan(**_torch_config("tiny-wan2.2"))
    assert written == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    config = json.loads((path / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLWan" and config["z_dim"] == 48 and config["patch_size"] == 2


def test_encode_size_not_a_multiple_of_16_is_a_clear_error(vae):
    with pytest.raises(ValueError, match=r"got 40x80 frames; .* multiples of 16"):
        vae.encode(np.zeros((1, 3, 1, 40, 80), np.float32))


def test_encode_patch_channels_are_a_clear_error(vae):
    with pytest.raises(ValueError, match=r"expected video \(B, 3, F, H, W\)"):
        vae.encode(np.zeros((1, 12, 1, 16, 16), np.float32))


def test_encode_tiles_that_cut_a_pool_are_a_clear_error(ckpt_dir):
    bad = VAELoader().load(ckpt_dir, precision="fp32", load_decoder=False,
                           **{**ENCODE_TILES, "tile_sample_stride_width": 12})
    with pytest.raises(ValueError, match=r"tile_sample_stride_width.* sides \[4, 16, 24\]; each must be a multiple of 8"):
        bad.encode(np.zeros((1, 3, 1, *SIZE), np.float32), tiled=True)


# A 2-stage Wan2.2-layout VAE (one up stage with both shortcuts and temporal upsampling) that compiles quickly.
MICRO = dict(base_dim=8, z_dim=16, dim_mult=(1, 2), num_res_blocks=1, temperal_downsample=(True,), is_residual=True,
             patch_size=2, in_channels=12, out_channels=12, scale_factor_temporal=2, scale_factor_spatial=4)


# Tiles of 4x4 latents at a stride of 4x3 (16x16 px, stride 16x12): 4x8 latents decode as 4x4, 4x4, 4x2 tiles.
MICRO_TILES = dict(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=16,
                   tile_sample_stride_width=12)


@pytest.fixture(scope="module")
def micro_vaes():
    """The same random micro VAE on one device and replicated on data=2 x sequence=4."""
    config = AutoencoderKLWan.config_class().update_model_arch(MICRO).update_model_config(load_encoder=False,
                                                                                         **MICRO_TILES)
    graph, abstract = build_abstract(AutoencoderKLWan, config)
    state = random_state(abstract, 7)
    mesh = make_mesh(MeshConfig(data=2, sequence=4))
    return nnx.merge(graph, state), nnx.merge(graph, jax.device_put(state, NamedSharding(mesh, PartitionSpec()))), mesh


@pytest.mark.parametrize("tiled", [False, True])
def test_decode_on_mesh_equals_one_device(micro_vaes, tiled):
    single, on_mesh, mesh = micro_vaes
    z = normal_latents(2, (1, 16, 2, 8, 8) if not tiled else (1, 16, 2, 4, 8))
    reference = np.asarray(single.decode(z, tiled=tiled))
    video = decode_on_mesh(on_mesh, z, mesh, tiled=tiled)
    assert video.shape == (1, 3, 3, 4 * z.shape[3], 4 * z.shape[4])
    err, msg = error_report(video, reference)
    assert err < 1e-5, f"decode (tiled={tiled}) split over data=2 x sequence=4 vs one device: {msg}"
