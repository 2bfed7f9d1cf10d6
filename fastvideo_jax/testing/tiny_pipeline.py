"""The ``tiny-wan`` and ``tiny-wan-i2v`` demo pipelines: complete Diffusers-layout Wan2.1 T2V and I2V checkpoints
with random weights.

Written by our own models (no torch): DiT, UMT5 text encoder, VAE, a tokenizer trained in code, a UniPC
scheduler config and, for image-to-video, a CLIP vision tower and its image processor config. Each runs the whole
generation path on a CPU in seconds. The weights are random, so the videos are noise; use them to check an
installation, not to judge quality.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from fastvideo_jax.configs.pipelines.registry import TINY_STEPVIDEO_ID, TINY_WAN_I2V_ID, TINY_WAN_ID
from fastvideo_jax.utils.paths import cache_dir, give_ordinary_mode

__all__ = ["TINY_IDS", "TINY_WAN_ID", "TINY_WAN_I2V_ID", "UNIPC_FLOW_CONFIG", "cache_dir", "ensure_tiny",
           "ensure_tiny_wan", "write_tiny_wan_i2v_pipeline", "write_tiny_wan_pipeline"]
_VERSION = "v1"

UNIPC_FLOW_CONFIG = {
    "_class_name": "UniPCMultistepScheduler",
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
}


def write_tiny_wan_pipeline(root: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline into ``root`` (created)."""
    from fastvideo_jax.configs.models.dits.wanvideo import WAN_PRESETS
    from fastvideo_jax.configs.models.encoders.t5 import T5_PRESETS
    from fastvideo_jax.configs.models.vaes.wanvae import WAN_VAE_PRESETS
    from fastvideo_jax.models.dits.wanvideo import WanTransformer3DModel
    from fastvideo_jax.models.encoders.t5 import UMT5EncoderModel
    from fastvideo_jax.models.vaes.wanvae import AutoencoderKLWan
    from fastvideo_jax.testing.tiny_checkpoints import write_random_component
    from fastvideo_jax.testing.tokenizer import write_t5_tokenizer

    root = Path(root)
    write_random_component(root / "transformer", WanTransformer3DModel, "WanTransformer3DModel",
                           {**WAN_PRESETS["tiny"], "text_dim": T5_PRESETS["tiny"]["d_model"]}, seed=seed)
    write_random_component(root / "text_encoder", UMT5EncoderModel, "UMT5EncoderModel", T5_PRESETS["tiny"],
                           weights_name="model.safetensors", seed=seed + 1, extra_config={"model_type": "umt5"})
    write_random_component(root / "vae", AutoencoderKLWan, "AutoencoderKLWan", WAN_VAE_PRESETS["tiny"], seed=seed + 2)
    write_t5_tokenizer(root / "tokenizer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(UNIPC_FLOW_CONFIG, indent=2))
    index = {
        "_class_name": "WanPipeline",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def write_tiny_wan_i2v_pipeline(root: str | Path, seed: int = 0) -> Path:
    """Write the tiny image-to-video pipeline (``WanImageToVideoPipeline``) into ``root``: the tiny T2V parts, a
    36-channel DiT with a CLIP image branch and a tiny CLIP vision tower (30x30 images, hidden size 24)."""
    from fastvideo_jax.configs.models.encoders.clip import CLIP_VISION_PRESETS
    from fastvideo_jax.models.encoders.clip import CLIPVisionModel
    from fastvideo_jax.testing.tiny_checkpoints import write_random_component, write_random_dit

    root = write_tiny_wan_pipeline(root, seed)
    shutil.rmtree(root / "transformer")
    write_random_dit(root / "transformer", "tiny-i2v", seed=seed)
    vision = CLIP_VISION_PRESETS["tiny"]
    write_random_component(root / "image_encoder", CLIPVisionModel, "CLIPVisionModel", vision,
                           weights_name="model.safetensors", seed=seed + 3,
                           extra_config={"model_type": "clip_vision_model"})
    size = vision["image_size"]
    (root / "image_processor").mkdir()
    (root / "image_processor" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }, indent=2))
    index = json.loads((root / "model_index.json").read_text())
    index.update({"_class_name": "WanImageToVideoPipeline", "image_encoder": ["transformers", "CLIPVisionModel"],
                  "image_processor": ["transformers", "CLIPImageProcessor"]})
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def _write_tiny_stepvideo(root: str | Path, seed: int = 0) -> Path:
    from fastvideo_jax.testing.tiny_stepvideo import write_tiny_stepvideo_pipeline

    return write_tiny_stepvideo_pipeline(root, seed)


TINY_IDS = {TINY_WAN_ID: write_tiny_wan_pipeline, TINY_WAN_I2V_ID: write_tiny_wan_i2v_pipeline,
            TINY_STEPVIDEO_ID: _write_tiny_stepvideo}


def ensure_tiny_wan() -> Path:
    """The tiny text-to-video pipeline's directory, written once (atomically) into the cache on first use."""
    return ensure_tiny(TINY_WAN_ID)


def ensure_tiny(model_id: str) -> Path:
    """A built-in tiny pipeline's directory (``tiny-wan``, ``tiny-wan-i2v``, ``tiny-stepvideo``), written once (atomically) into the
    cache on first use."""
    write = TINY_IDS[model_id]
    target = cache_dir() / f"{model_id}-{_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        give_ordinary_mode(tmp)
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
