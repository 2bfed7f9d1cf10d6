"""Text encoding: prompts (and, under CFG, negative prompts) -> the DiT's ``encoder_hidden_states``."""

from __future__ import annotations

from typing import Any

import jax

from fastvideo_jax.models.encoders.text import encode_prompts
from fastvideo_jax.parallel.memory import move_params
from fastvideo_jax.pipelines.batch import ForwardBatch
from fastvideo_jax.pipelines.stages.base import PipelineStage

__all__ = ["TextEncodingStage"]


class TextEncodingStage(PipelineStage):
    """``tokenizer`` + ``text_encoder`` -> ``conditioning[output_key]`` (B or 2B, text_len, D) in ``dtype``.

    ``offload`` keeps the encoder's parameters in host memory between prompts (moved to the devices to
    encode), so denoising has the device memory."""

    def __init__(self, tokenizer: Any, text_encoder: Any, *, text_len: int, clean: bool, dtype: Any,
                 offload: bool = False, output_key: str = "encoder_hidden_states"):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.text_len, self.clean, self.dtype, self.offload = text_len, clean, dtype, offload
        self.output_key = output_key

    def encode(self, prompts: list[str], negative: list[str] | None) -> jax.Array:
        """(B or 2B, text_len, D): cond rows, then uncond rows when ``negative`` is given."""
        texts = prompts + (negative or [])
        if self.offload:
            move_params(self.text_encoder, None)
        try:
            embeds, _ = encode_prompts(self.tokenizer, self.text_encoder, texts, self.text_len,
                                       clean=self.clean, dtype=self.dtype)
        finally:
            if self.offload:
                move_params(self.text_encoder, "pinned_host")
        return embeds

    def __call__(self, batch: ForwardBatch) -> ForwardBatch:
        param, n = batch.param, batch.batch_size
        negative = [param.negative_prompt or ""] * n if batch.do_cfg else None
        embeds = self.encode([param.prompt] * n, negative)
        return batch.replace(conditioning={**batch.conditioning, self.output_key: embeds})
