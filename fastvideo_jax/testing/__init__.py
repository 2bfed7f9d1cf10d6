"""Tiny random checkpoints in Diffusers layout, written without torch (tests, CLI demo, notebooks)."""

from fastvideo_jax.testing.tiny_checkpoints import (
    write_random_component,
    write_random_dit,
    write_random_hunyuan_dit,
    write_random_hunyuan_vae,
    write_random_stepvideo_dit,
    write_random_stepvideo_vae,
    write_random_vae,
)

__all__ = [
    "write_random_component",
    "write_random_dit",
    "write_random_hunyuan_dit",
    "write_random_hunyuan_vae",
    "write_random_stepvideo_dit",
    "write_random_stepvideo_vae",
    "write_random_vae",
]
