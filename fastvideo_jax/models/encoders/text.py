"""Prompt encoding as Wan's pipelines do it: clean, tokenize to a fixed length, encode, trim, zero-pad.

``encode_prompts`` follows Diffusers' ``WanPipeline._get_t5_prompt_embeds`` (and FastVideo's
``t5_postprocess_text``): every prompt is padded/truncated to ``text_len`` tokens (with ``</s>``), run through
the encoder with its attention mask, and each row keeps its first ``n`` hidden states, ``n`` being the prompt's
true token count, with zeros after them.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastvideo_jax.errors import NonFiniteError
from fastvideo_jax.models.encoders.base import TextEncoder
from fastvideo_jax.parallel.activations import mesh_scope
from fastvideo_jax.parallel.memory import params_mesh

logger = logging.getLogger(__name__)

__all__ = ["prompt_clean", "tokenize_prompts", "trim_and_pad", "encode_prompts"]


def prompt_clean(text: str) -> str:
    """Diffusers' Wan prompt cleaning: ftfy (when installed), HTML unescape twice, whitespace collapsed."""
    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def tokenize_prompts(tokenizer, prompts: Sequence[str], text_len: int, padding_side: str | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, both (B, text_len): padded to text_len (on ``padding_side``; None: the
    tokenizer's own), truncated (with a warning giving the token counts), with special tokens."""
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True, verbose=False)["input_ids"]]
    for i, n in enumerate(lengths):
        if n > text_len:
            logger.warning("prompt %d has %d tokens; only the first %d are used (text_len=%d), %d are dropped",
                           i, n, text_len, text_len, n - text_len)
    out = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=text_len,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="np",
        **({} if padding_side is None else {"padding_side": padding_side}),
    )
    return np.asarray(out["input_ids"]), np.asarray(out["attention_mask"])


def trim_and_pad(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Keep each row's first ``sum(mask)`` positions of (B, L, D), zero the rest (Diffusers' trim + zero-pad)."""
    seq_lens = jnp.sum(attention_mask > 0, axis=1)  # (B,)
    keep = jnp.arange(hidden.shape[1])[None, :] < seq_lens[:, None]  # (B, L)
    return jnp.where(keep[..., None], hidden, jnp.zeros((), hidden.dtype))


@nnx.jit
def _encode(encoder: TextEncoder, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    return trim_and_pad(encoder(input_ids, attention_mask).last_hidden_state, attention_mask)


def encode_prompts(
    tokenizer,
    encoder: TextEncoder,
    prompts: str | Sequence[str],
    text_len: int = 512,
    *,
    clean: bool = True,
    dtype=None,
) -> tuple[jax.Array, jax.Array]:
    """Prompt embeddings (B, text_len, D), zero after each prompt's tokens, and the token mask (B, text_len).

    ``clean`` applies Diffusers' prompt cleaning first (FastVideo does not clean); ``dtype`` casts the
    embeddings (Diffusers casts to the transformer's dtype before trimming).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("encode_prompts: no prompts given")
    if clean:
        prompts = [prompt_clean(p) for p in prompts]
    ids, mask = tokenize_prompts(tokenizer, prompts, text_len)
    if ids.shape[1] != text_len:
        raise ValueError(f"encode_prompts: tokenizer returned {ids.shape[1]} tokens per prompt, expected {text_len}")
    vocab = encoder.config.arch_config.vocab_size
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise ValueError(
            f"encode_prompts: token id {int(ids.max())} is outside the encoder's vocabulary of {vocab} "
            "(tokenizer and encoder do not belong together?)"
        )
    mask = jnp.asarray(mask, jnp.int32)
    with mesh_scope(params_mesh(encoder)):  # the work splits over the mesh the weights live on
        embeds = _encode(encoder, jnp.asarray(ids, jnp.int32), mask)
    if not bool(jnp.all(jnp.isfinite(embeds))):
        raise NonFiniteError("the text encoder produced NaN or Inf embeddings (try its fp32 precision)")
    if dtype is not None:
        embeds = embeds.astype(dtype)
    return embeds, mask
