"""The ``tiny-stepvideo`` demo pipeline: a complete StepVideo-T2V checkpoint in our Diffusers layout with random
weights (written by our own models, no torch): StepVideoModel, Step-LLM (``Step1Model``), BERT, the StepVideo VAE,
a SentencePiece StepChat tokenizer and a BertTokenizer trained in code, a flow-match Euler scheduler config. It
runs the whole StepVideo generation path on a CPU; the weights are random, so the videos are noise.

The layout (what ``StepVideoPipeline`` loads; the release's ``step_llm/`` + ``hunyuan_clip/`` folders are not)::

    model_index.json          _class_name StepVideoPipeline
    transformer/              StepVideoModel
    text_encoder/             Step1Model (config.json "architectures")
    tokenizer/                step1_chat_tokenizer.model
    text_encoder_2/           BertModel
    tokenizer_2/              BertTokenizer (vocab.txt)
    vae/                      AutoencoderKLStepvideo
    scheduler/                FlowMatchEulerDiscreteScheduler (the shift is the preset's)
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["TINY_STEPLLM", "TINY_STEPVIDEO_BERT", "write_tiny_stepvideo_pipeline"]

# The tiny tokenizers' vocabularies (120 SentencePiece pieces, 129 BERT tokens) fit these tables.
TINY_STEPLLM = dict(padded_vocab_size=128)
TINY_STEPVIDEO_BERT = dict(vocab_size=130, max_position_embeddings=80)

INDEX = {
    "_class_name": "StepVideoPipeline",
    "transformer": ["diffusers", "StepVideoModel"],
    "text_encoder": ["transformers", "Step1Model"],
    "tokenizer": ["fastvideo_jax", "StepChatTokenizer"],
    "text_encoder_2": ["transformers", "BertModel"],
    "tokenizer_2": ["transformers", "BertTokenizer"],
    "vae": ["diffusers", "AutoencoderKLStepvideo"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
}


def write_tiny_stepvideo_pipeline(root: str | Path, seed: int = 0) -> Path:
    """Write the tiny StepVideo pipeline into ``root`` (created)."""
    from fastvideo_jax.configs.models.dits.stepvideo import STEPVIDEO_PRESETS
    from fastvideo_jax.configs.models.encoders.bert import BERT_PRESETS
    from fastvideo_jax.configs.models.encoders.stepllm import STEPLLM_PRESETS
    from fastvideo_jax.configs.models.vaes.stepvideovae import STEPVIDEO_VAE_PRESETS
    from fastvideo_jax.models.dits.stepvideo import StepVideoModel
    from fastvideo_jax.models.encoders.bert import BertModel
    from fastvideo_jax.models.encoders.stepllm import Step1Model
    from fastvideo_jax.models.vaes.stepvideovae import AutoencoderKLStepvideo
    from fastvideo_jax.testing.tiny_checkpoints import write_random_component, write_random_stepvideo_vae
    from fastvideo_jax.testing.tokenizer import write_bert_tokenizer, write_step_tokenizer

    root = Path(root)
    llm = {**STEPLLM_PRESETS["tiny"], **TINY_STEPLLM}
    bert = {**BERT_PRESETS["tiny"], **TINY_STEPVIDEO_BERT}
    z = AutoencoderKLStepvideo.config_class().update_model_arch(STEPVIDEO_VAE_PRESETS["tiny"]).arch_config.z_dim
    dit = {**STEPVIDEO_PRESETS["tiny"], "in_channels": z, "out_channels": z,
           "caption_channels": [llm["hidden_size"], bert["hidden_size"]]}
    write_random_component(root / "transformer", StepVideoModel, "StepVideoModel", dit, seed=seed)
    write_random_component(root / "text_encoder", Step1Model, "Step1Model", llm, weights_name="model.safetensors",
                           seed=seed + 1)
    write_random_component(root / "text_encoder_2", BertModel, "BertModel", bert, weights_name="model.safetensors",
                           seed=seed + 2, extra_config={"model_type": "bert"})
    write_random_stepvideo_vae(root / "vae", "tiny", seed=seed + 3)
    write_step_tokenizer(root / "tokenizer")
    write_bert_tokenizer(root / "tokenizer_2")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1, "shift": 13.0}, indent=2))
    (root / "model_index.json").write_text(json.dumps(INDEX, indent=2))
    return root
