"""StepVideo prompt encoding: the Step-LLM tokenizer (StepChat SentencePiece, wrapped as the original wraps it) and
both encoders run as the original's caption server runs them.

The original (Step-Video-T2V's ``api/call_remote_server.py``, FastVideo 0.1.7's ``StepvideoPromptEncodingStage``):

* Step-LLM: ``[BOS=1] + sentencepiece ids[:text_len - 2] + [EOS=2]``, padded on the right with 2 to ``text_len``
  (320), mask 1 on the real tokens; its ``last_hidden_state`` is the DiT's ``encoder_hidden_states``, unmasked
  (the DiT attends each row's first ``sum(mask)`` tokens).
* BERT ("HunyuanClip"): ``BertTokenizer(padding="max_length", max_length=77, truncation=True)`` with its mask;
  its ``last_hidden_state`` is ``encoder_hidden_states_2``, every one of the 77 positions attended.
* the DiT's mask is the LLM mask with 77 ones in front (CLIP tokens first).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastvideo_jax.errors import CheckpointError, NonFiniteError, UserError
from fastvideo_jax.models.encoders.base import TextEncoder
from fastvideo_jax.models.encoders.text import tokenize_prompts
from fastvideo_jax.parallel.activations import mesh_scope
from fastvideo_jax.parallel.memory import params_mesh

logger = logging.getLogger(__name__)

__all__ = ["STEP_TOKENIZER_FILE", "StepChatTokenizer", "encode_stepvideo_prompts"]

STEP_TOKENIZER_FILE = "step1_chat_tokenizer.model"
BOS, EOS, PAD = 1, 2, 2  # fixed by the original's wrapper, whatever the SentencePiece model says


class StepChatTokenizer:
    """Step-LLM's tokenizer: a SentencePiece model, wrapped as ``Wrapped_StepChatTokenizer`` (BOS, ids, EOS,
    right padding with EOS). ``__call__(texts, text_len)`` -> (ids, mask), both (B, text_len) int32."""

    def __init__(self, model_file: str | Path):
        import sentencepiece

        model_file = Path(model_file)
        if not model_file.is_file():
            raise CheckpointError(f"{model_file}: Step-LLM tokenizer model missing")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except Exception as e:  # sentencepiece raises bare RuntimeErrors for a corrupt file
            raise CheckpointError(f"{model_file}: not a SentencePiece model ({type(e).__name__}: {e})") from e
        self.model_file = model_file

    @classmethod
    def from_dir(cls, directory: str | Path) -> "StepChatTokenizer":
        return cls(Path(directory) / STEP_TOKENIZER_FILE)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __call__(self, texts: Sequence[str], text_len: int) -> tuple[np.ndarray, np.ndarray]:
        if text_len < 2:
            raise ValueError(f"text_len must leave room for BOS and EOS, got {text_len}")
        ids = np.full((len(texts), text_len), PAD, np.int32)
        mask = np.zeros((len(texts), text_len), np.int32)
        for row, text in enumerate(texts):
            pieces = self.sp.encode_as_ids(text)
            if len(pieces) > text_len - 2:
                logger.warning("prompt %d has %d Step-LLM tokens; only the first %d are used (text_len=%d)",
                               row, len(pieces), text_len - 2, text_len)
            tokens = [BOS, *pieces[: text_len - 2], EOS]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return ids, mask


@nnx.jit
def _run(encoder: TextEncoder, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return encoder(ids, mask).last_hidden_state


def _encode(encoder: TextEncoder, ids: np.ndarray, mask: np.ndarray, what: str) -> jax.Array:
    vocab = encoder.config.arch_config.vocab_size
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise UserError(f"{what}: token id {int(ids.max())} is outside the encoder's vocabulary of {vocab} "
                        "(tokenizer and encoder do not belong together?)")
    with mesh_scope(params_mesh(encoder)):  # the work splits over the mesh the weights live on
        out = _run(encoder, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    if not bool(jnp.all(jnp.isfinite(out))):
        raise NonFiniteError(f"{what} produced NaN or Inf embeddings (try its fp32 precision)")
    return out


def encode_stepvideo_prompts(tokenizer: StepChatTokenizer, text_encoder: TextEncoder, tokenizer_2: Any,
                             text_encoder_2: TextEncoder, prompts: Sequence[str], *, text_len: int = 320,
                             clip_len: int = 77, dtype: Any = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(llm (B, text_len, D), clip (B, clip_len, D2), mask (B, clip_len + text_len) int32) for ``prompts`` (the
    magic suffixes already appended), each cast to ``dtype`` (the DiT's) when given."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode_stepvideo_prompts: no prompts given")
    ids, mask = tokenizer(prompts, text_len)
    llm = _encode(text_encoder, ids, mask, "the Step-LLM text encoder")
    ids_2, mask_2 = tokenize_prompts(tokenizer_2, prompts, clip_len, padding_side="right")
    if ids_2.shape[1] != clip_len:
        raise ValueError(f"the CLIP (BERT) tokenizer returned {ids_2.shape[1]} tokens per prompt, expected {clip_len}")
    clip = _encode(text_encoder_2, ids_2, mask_2, "the CLIP (BERT) text encoder")
    full_mask = np.concatenate([np.ones((len(prompts), clip.shape[1]), np.int32), mask], axis=1)
    if dtype is not None:
        llm, clip = llm.astype(dtype), clip.astype(dtype)
    return llm, clip, jnp.asarray(full_mask)
