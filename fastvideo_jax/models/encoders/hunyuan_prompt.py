"""HunyuanVideo's prompt encoding: the LLaMA template path and the CLIP pooled path, as Diffusers'
``HunyuanVideoPipeline._get_llama_prompt_embeds`` / ``_get_clip_prompt_embeds`` do it.

LLaMA: each prompt is put into the template (a system message asking for a video description, then the user
turn holding the prompt), tokenized to ``max_sequence_length + crop_start`` tokens (padded on the right, as
HunyuanVideo loads its tokenizer, whatever the tokenizer's own side; truncated), run through the encoder with its
mask; the hidden state ``num_hidden_layers_to_skip`` layers before the last
(``hidden_states[-(skip + 1)]``, not normed unless skip is 0) is kept, and its first ``crop_start`` positions (the
template's system turn and user header) are cropped off the embeddings and the mask. The padded positions keep
their (masked) values, as Diffusers keeps them; the DiT reads the mask.

CLIP: each prompt tokenized to the CLIP tokenizer's length (77) without a mask, the pooled output kept.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastvideo_jax.errors import NonFiniteError, UserError
from fastvideo_jax.models.encoders.base import TextEncoder
from fastvideo_jax.models.encoders.text import tokenize_prompts
from fastvideo_jax.parallel.activations import mesh_scope
from fastvideo_jax.parallel.memory import params_mesh

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "template_crop_start",
    "encode_llama_prompts",
    "encode_clip_pooled",
    "encode_hunyuan_prompts",
]

# HunyuanVideo's video template; crop_start is its token count before the prompt for the llava-llama-3 tokenizer.
DEFAULT_PROMPT_TEMPLATE: Mapping[str, Any] = MappingProxyType({
    "template": (
        "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
        "1. The main content and theme of the video."
        "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
        "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
        "4. background environment, light, style and atmosphere."
        "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    ),
    "crop_start": 95,
})


def _as_list(prompts: str | Sequence[str], what: str) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise UserError(f"{what}: prompts must be a string or a non-empty list of strings")
    return prompts


def template_crop_start(tokenizer, template: str) -> int:
    """The template's token count before the prompt, computed as Diffusers does when a template has no
    ``crop_start``: the template's tokens (special tokens included) less two, the ``{}`` and the final
    ``<|eot_id|>``."""
    ids = tokenizer(template, padding="max_length", return_attention_mask=False)["input_ids"]
    return len(ids) - 2


def _check_vocab(ids: np.ndarray, encoder: TextEncoder, what: str) -> None:
    vocab = encoder.config.arch_config.vocab_size
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise UserError(f"{what}: token id {int(ids.max())} is outside the encoder's vocabulary of {vocab} "
                        "(tokenizer and encoder do not belong together?)")


@functools.partial(nnx.jit, static_argnames=("skip", "crop_start"))
def _llama_embeds(encoder: TextEncoder, ids: jax.Array, mask: jax.Array, skip: int, crop_start: int):
    hidden = encoder(ids, mask, output_hidden_states=True).hidden_states[-(skip + 1)]
    return hidden[:, crop_start:], mask[:, crop_start:]


def encode_llama_prompts(
    tokenizer,
    encoder: TextEncoder,
    prompts: str | Sequence[str],
    *,
    prompt_template: Mapping[str, Any] = DEFAULT_PROMPT_TEMPLATE,
    max_sequence_length: int = 256,
    num_hidden_layers_to_skip: int = 2,
    num_videos_per_prompt: int = 1,
    dtype=None,
) -> tuple[jax.Array, jax.Array]:
    """Prompt embeddings (B * n, max_sequence_length, D) and their mask (B * n, max_sequence_length) int32,
    ``n = num_videos_per_prompt`` copies of each prompt in a row (Diffusers' order).

    ``prompt_template``: ``{"template": "...{}...", "crop_start": int}``; without ``crop_start`` it is computed
    from the tokenizer (``template_crop_start``). ``dtype`` casts the embeddings (default: the encoder's).
    """
    what = "encode_llama_prompts"
    prompts = _as_list(prompts, what)
    template = prompt_template.get("template") if isinstance(prompt_template, Mapping) else None
    if not isinstance(template, str) or template.count("{}") != 1:
        raise UserError(f"{what}: prompt_template['template'] must be a string with exactly one '{{}}' for the prompt")
    layers = encoder.config.arch_config.num_hidden_layers
    if not 0 <= num_hidden_layers_to_skip <= layers:
        raise UserError(f"{what}: num_hidden_layers_to_skip={num_hidden_layers_to_skip} must be in [0, {layers}] "
                        f"(the encoder has {layers} layers)")
    if max_sequence_length < 1 or num_videos_per_prompt < 1:
        raise UserError(f"{what}: max_sequence_length={max_sequence_length} and num_videos_per_prompt="
                        f"{num_videos_per_prompt} must be >= 1")
    crop_start = prompt_template.get("crop_start")
    if crop_start is None:
        crop_start = template_crop_start(tokenizer, template)
    if not isinstance(crop_start, int) or crop_start < 0:
        raise UserError(f"{what}: prompt_template['crop_start'] must be an int >= 0, got {crop_start!r}")
    # Padded on the right whatever the tokenizer's own side (Transformers 5's LlamaTokenizerFast pads left): the
    # crop takes the template's tokens off the front, so they must start every row (HunyuanVideo pads right).
    ids, mask = tokenize_prompts(tokenizer, [template.format(p) for p in prompts], max_sequence_length + crop_start,
                                 padding_side="right")
    _check_vocab(ids, encoder, what)
    prefix = tokenizer(template, return_attention_mask=False)["input_ids"][:crop_start]
    if len(prefix) < crop_start or np.any(ids[:, :crop_start] != np.asarray(prefix)[None]):
        logger.warning("%s: the first crop_start=%d tokens of the templated prompts are not the template's own "
                       "(a crop_start for another tokenizer?); the crop may cut prompt tokens or keep template ones",
                       what, crop_start)
    with mesh_scope(params_mesh(encoder)):  # the work splits over the mesh the weights live on
        embeds, mask = _llama_embeds(encoder, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                                     skip=num_hidden_layers_to_skip, crop_start=crop_start)
    if not bool(jnp.all(jnp.isfinite(embeds))):
        raise NonFiniteError("the LLaMA text encoder produced NaN or Inf embeddings (try its fp32 precision)")
    if dtype is not None:
        embeds = embeds.astype(dtype)
    if num_videos_per_prompt > 1:
        embeds, mask = (jnp.repeat(a, num_videos_per_prompt, axis=0) for a in (embeds, mask))
    return embeds, mask


@nnx.jit
def _clip_pooled(encoder: TextEncoder, ids: jax.Array) -> jax.Array:
    return encoder(ids).pooler_output


def encode_clip_pooled(
    tokenizer,
    encoder: TextEncoder,
    prompts: str | Sequence[str],
    *,
    max_sequence_length: int | None = None,
    num_videos_per_prompt: int = 1,
    dtype=None,
) -> jax.Array:
    """CLIP's pooled prompt embeddings (B * n, D'): tokenized to ``max_sequence_length`` (default: the encoder's
    ``max_position_embeddings``, 77 for CLIP-L), run without an attention mask, as Diffusers does."""
    what = "encode_clip_pooled"
    prompts = _as_list(prompts, what)
    length = max_sequence_length or encoder.config.arch_config.max_position_embeddings
    if num_videos_per_prompt < 1:
        raise UserError(f"{what}: num_videos_per_prompt={num_videos_per_prompt} must be >= 1")
    ids, _ = tokenize_prompts(tokenizer, prompts, length)
    _check_vocab(ids, encoder, what)
    with mesh_scope(params_mesh(encoder)):
        pooled = _clip_pooled(encoder, jnp.asarray(ids, jnp.int32))
    if not bool(jnp.all(jnp.isfinite(pooled))):
        raise NonFiniteError("the CLIP text encoder produced NaN or Inf pooled embeddings (try its fp32 precision)")
    if dtype is not None:
        pooled = pooled.astype(dtype)
    return jnp.repeat(pooled, num_videos_per_prompt, axis=0) if num_videos_per_prompt > 1 else pooled


def encode_hunyuan_prompts(
    tokenizer,
    text_encoder: TextEncoder,
    tokenizer_2,
    text_encoder_2: TextEncoder,
    prompts: str | Sequence[str],
    prompts_2: str | Sequence[str] | None = None,
    *,
    prompt_template: Mapping[str, Any] = DEFAULT_PROMPT_TEMPLATE,
    max_sequence_length: int = 256,
    num_hidden_layers_to_skip: int = 2,
    num_videos_per_prompt: int = 1,
    dtype=None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Diffusers' ``HunyuanVideoPipeline.encode_prompt``: (prompt_embeds (B*n, L, D), prompt_attention_mask
    (B*n, L), pooled_prompt_embeds (B*n, D')); ``prompts_2`` (default: ``prompts``) go to CLIP, as Diffusers
    documents ``prompt_2`` (its ``encode_prompt`` (0.42) sends ``prompt`` to CLIP even when ``prompt_2`` is given)."""
    prompts = _as_list(prompts, "encode_hunyuan_prompts")
    prompts_2 = prompts if prompts_2 is None else _as_list(prompts_2, "encode_hunyuan_prompts (prompts_2)")
    if len(prompts_2) != len(prompts):
        raise UserError(f"encode_hunyuan_prompts: {len(prompts)} prompts but {len(prompts_2)} prompts_2")
    embeds, mask = encode_llama_prompts(
        tokenizer, text_encoder, prompts, prompt_template=prompt_template, max_sequence_length=max_sequence_length,
        num_hidden_layers_to_skip=num_hidden_layers_to_skip, num_videos_per_prompt=num_videos_per_prompt,
        dtype=dtype)
    pooled = encode_clip_pooled(tokenizer_2, text_encoder_2, prompts_2, num_videos_per_prompt=num_videos_per_prompt,
                                dtype=dtype)
    return embeds, mask, pooled
