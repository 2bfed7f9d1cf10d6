"""StepVideo-T2V pipeline presets: flow shift, the prompt suffixes the original appends, precisions, text lengths.

Values, and where they come from:

* ``pos_magic`` / ``neg_magic``: FastVideo 0.1.7's ``StepVideoT2VConfig`` (the defaults of Step-Video-T2V's
  ``run_parallel.py``): the prompt becomes ``prompt + pos_magic``; the unconditional text is ``neg_magic`` (here
  ``negative_prompt + neg_magic``, so the default empty negative prompt gives the original's text).
* T2V: flow shift 13, CFG 9, 30-50 steps (FastVideo's ``flow_shift=13`` and sampling default 50 steps, CFG 9.0;
  the release README's recommendation); Turbo (``stepfun-ai/stepvideo-t2v-turbo``): shift 17, CFG 5, 10-15
  steps (the release README's table).
* Step-LLM in bf16 as the original runs it (under bf16 autocast), the BERT in fp32 as FastVideo loads it, the DiT
  and VAE in bf16 (FastVideo's ``precision`` / ``vae_precision``); 320 LLM tokens, 77 BERT tokens.
* frames: the VAE decodes 17-frame chunks of 3 latent frames each, so ``num_frames`` is a multiple of 17
  (``frame_chunk``); the latent grid is (num_frames / 17 x 3, H / 16, W / 16).
"""

from __future__ import annotations

import dataclasses

from fastvideo_jax.configs.pipelines.base import PipelineConfig
from fastvideo_jax.errors import UserError

POS_MAGIC = "超高清、HDR 视频、环境光、杜比全景声、画面稳定、流畅动作、逼真的细节、专业级构图、超现实主义、自然、生动、超细节、清晰。"
NEG_MAGIC = "画面暗、低分辨率、不良手、文本、缺少手指、多余的手指、裁剪、低质量、颗粒状、签名、水印、用户名、模糊。"


@dataclasses.dataclass(frozen=True)
class StepVideoT2VConfig(PipelineConfig):
    """StepVideo-T2V (30-50 steps, CFG 9): shift 13."""

    flow_shift: float | None = 13.0
    dit_precision: str = "bf16"
    vae_decode_precision: str = "bf16"
    text_encoder_precisions: tuple[str, ...] = ("bf16", "fp32")  # Step-LLM, BERT
    text_len: int = 320  # Step-LLM tokens
    clip_len: int = 77  # BERT tokens
    clean_prompts: bool = False  # the original does not clean prompts
    pos_magic: str = POS_MAGIC
    neg_magic: str = NEG_MAGIC
    frame_chunk: int = 17  # frames per VAE chunk (3 latent frames)

    def validate(self) -> "StepVideoT2VConfig":
        super().validate()
        for name in ("pos_magic", "neg_magic"):
            if not isinstance(getattr(self, name), str):
                raise UserError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("clip_len", "frame_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{name} must be a positive int, got {value!r}")
        if self.text_len < 2:
            raise UserError(f"text_len must be at least 2 (Step-LLM's BOS and EOS), got {self.text_len}")
        return self


@dataclasses.dataclass(frozen=True)
class StepVideoT2VTurboConfig(StepVideoT2VConfig):
    """StepVideo-T2V-Turbo (distilled; 10-15 steps, CFG 5): shift 17."""

    flow_shift: float | None = 17.0
