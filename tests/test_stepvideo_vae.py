"""Parity of the NNX StepVideo VAE with StepFun's code (diffsynth 1.1.9's ``stepvideo_vae``, the oracle).

A tiny original (``VideoEncoder`` / ``VideoDecoder`` version 2 at the ``tiny`` preset's widths: 4 levels, a width
change with a 1x1 shortcut on each side, GroupNorm groups of 2 channels) gets noise on every parameter, is saved
under the release's tensor names (``decoder.conv_out.weight``) and loaded through ``VAELoader``. Decode runs the
original's chunked decode (3-latent chunks, boundary frames mixed) on 1, 3 and 8 latent frames (8 = two chunks
and a ragged one of 2, two mixed boundaries); encode runs its 17-frame chunks on 1, 17 and 26 frames (a ragged
chunk of 9). Latents are 2x3 (an odd width). The mid-block attention runs in query blocks of 48 so that its
blocked, padded path is the one compared.
"""

from __future__ import annotations

import copy
import json

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from fastvideo_jax.configs.models.vaes.stepvideovae import STEPVIDEO_VAE_PRESETS, StepVideoVAEArchConfig  # noqa: E402
from fastvideo_jax.errors import UserError  # noqa: E402
from fastvideo_jax.models.loader.component_loader import VAELoader, build_abstract, export_component  # noqa: E402
from fastvideo_jax.models.vaes.parallel_decode import decode_on_mesh  # noqa: E402
from fastvideo_jax.models.vaes.stepvideovae import AutoencoderKLStepvideo, mix_chunk_boundaries  # noqa: E402
from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh  # noqa: E402
from fastvideo_jax.testing.tiny_checkpoints import random_state  # noqa: E402
from tests.oracles import add_noise  # noqa: E402
from tests.stepvideo_oracle import diffsynth_module  # noqa: E402

TOL = 1e-4  # fp32, whole model: relative (Frobenius) error
TINY = STEPVIDEO_VAE_PRESETS["tiny"]
Z = TINY["z_channels"]
LATENT_HW = (2, 3)
PIXEL_HW = (32, 48)


def _oracle():
    module = diffsynth_module("stepvideo_vae")
    module.base_group_norm.spatial = True  # what StepVideoVAE(version=2) sets: per-frame GroupNorm
    return module


def _err(got, ref) -> tuple[float, str]:
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    assert got.shape == ref.shape, f"shape {got.shape} != reference {ref.shape}"
    rel = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))
    return rel, f"max-abs {float(np.abs(got - ref).max()):.3e}, relative {rel:.3e}"


def _tiny_original():
    """The original StepVideoVAE (version 2) with the tiny preset's encoder and decoder."""
    m = _oracle()
    vae = m.StepVideoVAE.__new__(m.StepVideoVAE)  # its __init__ builds the real widths; the tiny parts instead
    torch.nn.Module.__init__(vae)
    vae.frame_len, vae.latent_len, vae.world_size = 17, 3, 1
    vae.encoder = m.VideoEncoder(ch=TINY["encoder_ch"], ch_mult=TINY["encoder_ch_mult"], z_channels=Z, version=2)
    vae.decoder = m.VideoDecoder(ch=TINY["decoder_ch"], ch_mult=TINY["decoder_ch_mult"], z_channels=Z, version=2)
    return vae.eval()


@pytest.fixture(scope="module")
def torch_vae():
    torch.manual_seed(0)
    return add_noise(_tiny_original())


@pytest.fixture(scope="module")
def ckpt_dir(torch_vae, tmp_path_factory):
    path = tmp_path_factory.mktemp("stepvideo_vae")
    m = _oracle()
    # The release's names: the converter's from_civitai maps decoder.conv_out.* to the module's conv_out.conv.*.
    state = {k.replace("decoder.conv_out.conv.", "decoder.conv_out."): v.contiguous()
             for k, v in torch_vae.state_dict().items()}
    assert m.StepVideoVAEStateDictConverter().from_civitai(state).keys() == torch_vae.state_dict().keys()
    safetensors_torch.save_file(state, path / "diffusion_pytorch_model.safetensors")
    config = {"_class_name": "AutoencoderKLStepvideo", **{k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in TINY.items()}}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def vae(ckpt_dir):
    return VAELoader().load(ckpt_dir, precision="fp32", attention_block=48)


def _ref_decode(torch_vae, z: np.ndarray) -> np.ndarray:
    _oracle()
    with torch.no_grad():  # the original takes (B, T, C, h, w) and returns (B, F, C, H, W)
        video = torch_vae.decode(torch.from_numpy(z).permute(0, 2, 1, 3, 4), device="cpu")
    return video.permute(0, 2, 1, 3, 4).numpy()


def _ref_encode(torch_vae, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The original's encode up to its posterior (which it samples): chunks of 17 frames, concatenated."""
    _oracle()
    with torch.no_grad():
        chunks = torch.from_numpy(x).permute(0, 2, 1, 3, 4).split(torch_vae.frame_len, dim=1)
        moments = torch.cat([torch_vae.naive_encode(c) for c in chunks], dim=1)
        dist = _oracle().DiagonalGaussianDistribution(moments)
    return dist.mean.permute(0, 2, 1, 3, 4).numpy(), dist.logvar.permute(0, 2, 1, 3, 4).numpy()


@pytest.mark.parametrize("latent_frames", [1, 3, 8])
def test_decode_matches_original(torch_vae, vae, latent_frames):
    z = np.random.default_rng(latent_frames).standard_normal((2, Z, latent_frames, *LATENT_HW)).astype(np.float32)
    ref = _ref_decode(torch_vae, z)
    got = vae.decode(z)
    assert got.shape[2] == vae.num_frames(latent_frames) == {1: 1, 3: 17, 8: 43}[latent_frames]
    rel, msg = _err(got, ref)
    assert rel < TOL, f"decode, {latent_frames} latent frames: {msg}"


@pytest.mark.parametrize("frames", [1, 17, 26])
def test_encode_matches_original(torch_vae, vae, frames):
    x = np.random.default_rng(frames).uniform(-1, 1, (2, 3, frames, *PIXEL_HW)).astype(np.float32)
    mean_ref, logvar_ref = _ref_encode(torch_vae, x)
    mean, logvar = vae.encode_distribution(x)
    assert mean.shape[2] == vae.num_latent_frames(frames) == {1: 1, 17: 3, 26: 5}[frames]
    for name, got, ref in (("mean", mean, mean_ref), ("logvar", logvar, logvar_ref)):
        rel, msg = _err(got, ref)
        assert rel < TOL, f"encode {name}, {frames} frames: {msg}"
    np.testing.assert_array_equal(np.asarray(vae.encode(x)), np.asarray(mean))


def test_tiled_decode_matches_diffsynth(torch_vae, ckpt_dir):
    """DiffSynth's tiled decode: 5x5 latents in tiles of 3 every 2 (a 2x2 grid of 3x3 tiles, blended by linear
    masks over 16 px both ways), one chunk. (On several chunks diffsynth's ``decode(tiled=True)`` applies its
    boundary ``mix`` to the channel axis, a no-op; ours blends the boundaries as the untiled decode does.) Tiling
    must change the video, or this proves nothing about it."""
    tiles = dict(tile_sample_min_height=48, tile_sample_min_width=48, tile_sample_stride_height=32,
                 tile_sample_stride_width=32)
    vae = VAELoader().load(ckpt_dir, precision="fp32", load_encoder=False, use_tiling=True, **tiles)
    z = np.random.default_rng(5).standard_normal((1, Z, 3, 5, 5)).astype(np.float32)
    _oracle()
    with torch.no_grad():
        hs = torch.from_numpy(z).permute(0, 2, 1, 3, 4)
        ref = torch_vae.tiled_decode(hs, "cpu", tile_size=(3, 3), tile_stride=(2, 2)).numpy()  # (B, C, F, H, W)
        plain = torch_vae.decode(hs, device="cpu").permute(0, 2, 1, 3, 4).numpy()
    rel, msg = _err(vae.decode(z), ref)  # tiled by the config's use_tiling
    assert rel < TOL, f"tiled decode: {msg}"
    assert _err(ref, plain)[0] > 100 * TOL, "diffsynth's tiling did not change the video"


def test_bf16_decode_as_accurate_as_the_originals_bf16(torch_vae, ckpt_dir):
    """bf16 has 8 mantissa bits; the justified bound is the original's own bf16 error against fp32 (ours keeps
    the GroupNorm statistics and the attention softmax in fp32)."""
    z = np.random.default_rng(3).standard_normal((2, Z, 3, *LATENT_HW)).astype(np.float32)
    ref = _ref_decode(torch_vae, z)
    with torch.no_grad():
        ref16 = copy.deepcopy(torch_vae).to(torch.bfloat16).decode(
            torch.from_numpy(z).permute(0, 2, 1, 3, 4), device="cpu").float().permute(0, 2, 1, 3, 4).numpy()
    ours = VAELoader().load(ckpt_dir, precision="bf16", load_encoder=False)
    got = np.asarray(ours.decode(z).astype(np.float32))
    ours_err, torch_err = np.abs(got - ref).mean(), np.abs(ref16 - ref).mean()
    assert ours_err <= 1.5 * torch_err, f"bf16 mean-abs error {ours_err:.3e}, the original's bf16 {torch_err:.3e}"


def test_second_decode_does_not_compile(vae, count_compiles):
    """Eager use: every chunk is one cached compiled call, so decoding the same shape again compiles nothing."""
    z = np.random.default_rng(4).standard_normal((2, Z, 3, *LATENT_HW)).astype(np.float32)
    first = np.asarray(vae.decode(z))
    with count_compiles() as n:
        again = np.asarray(vae.decode(z))
    assert n[0] == 0, f"{n[0]} compilations on the second same-shape decode"
    np.testing.assert_array_equal(again, first)


def test_mix_is_the_originals():
    """The chunk-boundary blend, alone, against the original's ``mix`` (both frames from the unblended values)
    on 3 boundaries and a ragged tail; it must change the boundary frames."""
    m = _oracle()
    holder = type("Holder", (), {"frame_len": 17})()
    x = np.random.default_rng(0).standard_normal((2, 60, 3, 2, 2)).astype(np.float32)  # (B, F, C, H, W)
    ref = m.StepVideoVAE.mix(holder, torch.from_numpy(x.copy()), smooth_scale=0.6).numpy()
    got = np.asarray(mix_chunk_boundaries(np.moveaxis(x, 1, 2), 17, 0.6))
    np.testing.assert_allclose(np.moveaxis(got, 2, 1), ref, rtol=1e-6, atol=1e-6)
    assert np.abs(ref - x)[:, [16, 17, 33, 34, 50, 51]].min() > 0 and np.abs(ref - x)[:, 18:33].max() == 0


def test_latent_scaling_is_identity(vae):
    """scaling_factor 1.0 and no shift (the release's config; FastVideo's StepVideoVAEArchConfig)."""
    assert StepVideoVAEArchConfig().scaling_factor == 1.0
    z = np.random.default_rng(0).standard_normal((1, Z, 2, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(vae.denormalize_latents(z)), z)
    np.testing.assert_array_equal(np.asarray(vae.normalize_latents(z)), z)


def test_export_round_trips(torch_vae, vae):
    exported = export_component(vae)
    state = {k.replace("decoder.conv_out.conv.", "decoder.conv_out."): v.numpy()
             for k, v in torch_vae.state_dict().items()}
    assert sorted(exported) == sorted(state)
    for k, v in state.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_bad_input_is_refused_before_work(vae):
    with pytest.raises(UserError, match="a last chunk of 5 frames is not encodable"):
        vae.encode(np.zeros((1, 3, 22, 32, 32), np.float32))
    with pytest.raises(UserError, match="multiples of 16, got 40x32"):
        vae.encode(np.zeros((1, 3, 1, 40, 32), np.float32))
    with pytest.raises(UserError, match="expected video \\(B, 3, F, H, W\\)"):
        vae.encode(np.zeros((1, 4, 1, 32, 32), np.float32))
    with pytest.raises(UserError, match="expected latents \\(B, 4, T, h, w\\)"):
        vae.decode(np.zeros((1, 8, 1, 2, 2), np.float32))
    with pytest.raises(UserError, match="spatial tiling is not implemented for encoding"):
        vae.encode(np.zeros((1, 3, 1, 32, 32), np.float32), tiled=True)
    with pytest.raises(ValueError, match="tile_sample_min_height=48 and tile_sample_stride_height=48"):
        vae.config.update_model_config(tile_sample_min_height=48, tile_sample_stride_height=48)
    with pytest.raises(ValueError, match="only StepVideo's vae_v2"):
        StepVideoVAEArchConfig().update_model_arch({"version": 1})
    with pytest.raises(ValueError, match="not multiples of the 32 norm groups"):
        StepVideoVAEArchConfig().update_model_arch({"encoder_ch": 16})


def test_decode_on_mesh_equals_one_device():
    """The decoder split over data=2 x sequence=4 (rows of every activation, per-frame GroupNorm statistics and
    the token-causal attention across shards): the one-device decode."""
    config = AutoencoderKLStepvideo.config_class().update_model_arch(TINY)
    graph, abstract = build_abstract(AutoencoderKLStepvideo, config.update_model_config(load_encoder=False))
    state = random_state(abstract, 7)
    mesh = make_mesh(MeshConfig(data=2, sequence=4))
    single = nnx.merge(graph, state)
    on_mesh = nnx.merge(graph, jax.device_put(state, NamedSharding(mesh, PartitionSpec())))
    z = np.random.default_rng(2).standard_normal((2, Z, 1, 4, 2)).astype(np.float32)
    reference = np.asarray(single.decode(z))
    video = decode_on_mesh(on_mesh, z, mesh)
    assert len({str(s.index) for s in video.addressable_shards}) > 1, f"output not split: {video.sharding}"
    rel, msg = _err(video, reference)
    assert rel < 1e-5, f"decode split over data=2 x sequence=4 vs one device: {msg}"


def test_random_checkpoint_loads_in_the_original(tmp_path):
    """``write_random_stepvideo_vae`` (tiny pipelines) writes the release's names, which the original's converter
    loads into the original's modules with every tensor matched (strict), holding exactly our weights."""
    from fastvideo_jax.testing import write_random_stepvideo_vae

    path = write_random_stepvideo_vae(tmp_path / "vae", seed=3)
    m = _oracle()
    state = m.StepVideoVAEStateDictConverter().from_civitai(
        safetensors_torch.load_file(path / "diffusion_pytorch_model.safetensors"))
    original = _tiny_original()
    original.load_state_dict(state, strict=True)
    exported = export_component(VAELoader().load(path, precision="fp32"))
    for k, v in original.state_dict().items():
        np.testing.assert_array_equal(exported[k.replace("decoder.conv_out.conv.", "decoder.conv_out.")], v.numpy(),
                                      err_msg=k)
