"""A tiny T5-style tokenizer trained in code (no download), for the random-weight demo checkpoint and tests."""

from __future__ import annotations

from pathlib import Path

_CORPUS = [
    "a cat playing piano in a sunny room",
    "a dog running on the beach at sunset",
    "an astronaut riding a horse on the moon",
    "a red car driving through a city at night",
    "waves crashing on rocks under a stormy sky",
    "a bird flying over snowy mountains",
    "a chef cooking pasta in a busy kitchen",
    "children playing football in a green park",
    "a timelapse of clouds moving over a lake",
    "a robot dancing in the rain",
]


def build_t5_tokenizer(vocab_size: int = 100):
    """A Unigram tokenizer with T5's special tokens (<pad>=0, </s>=1, <unk>=2) wrapped as ``T5Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5Tokenizer(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)


def write_t5_tokenizer(directory: str | Path, vocab_size: int = 100):
    tokenizer = build_t5_tokenizer(vocab_size)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def build_clip_tokenizer():
    """A tiny byte-pair ``CLIPTokenizer`` (a-z, each also as a word end, four merges, then <|startoftext|> and
    <|endoftext|>; 58 ids): CLIP's special tokens and padding (pad = eos = <|endoftext|>), no download."""
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = letters + [c + "</w>" for c in letters] + ["th", "the</w>", "ca", "cat</w>"]
    vocab = {p: i for i, p in enumerate(pieces + ["<|startoftext|>", "<|endoftext|>"])}
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>")]
    return CLIPTokenizer(vocab=vocab, merges=merges)


def write_clip_tokenizer(directory: str | Path):
    tokenizer = build_clip_tokenizer()
    tokenizer.save_pretrained(str(directory))
    return tokenizer


# Llama 3's special tokens that HunyuanVideo's prompt template uses, then bos/eos, pad and unk.
_LLAMA_SPECIALS = ("<unk>", "<pad>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>")


def build_llama_tokenizer(extra_text: str = ""):
    """A tiny word-level ``PreTrainedTokenizerFast`` with Llama 3's special tokens (``<|begin_of_text|>`` added
    first, as Llama 3's tokenizer does; ``<pad>`` pads on the right), whose words are those of ``_CORPUS``,
    ``extra_text`` and HunyuanVideo's prompt template (so the template's tokens, ``{}`` included, are real
    tokens and its ``crop_start`` means what it does for the real tokenizer). No download."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from fastvideo_jax.models.encoders.hunyuan_prompt import DEFAULT_PROMPT_TEMPLATE

    text = " ".join([*_CORPUS, extra_text, DEFAULT_PROMPT_TEMPLATE["template"]])
    for special in _LLAMA_SPECIALS:
        text = text.replace(special, " ")
    words = sorted(set(re.findall(r"\w+|[^\w\s]+", text)))  # as the Whitespace pre-tokenizer splits
    vocab = {token: i for i, token in enumerate((*_LLAMA_SPECIALS, *words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", vocab["<|begin_of_text|>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=list(_LLAMA_SPECIALS[4:]))


def write_llama_tokenizer(directory: str | Path, extra_text: str = ""):
    """``build_llama_tokenizer`` saved to ``directory`` (loads with ``AutoTokenizer`` / ``PreTrainedTokenizerFast``)."""
    tokenizer = build_llama_tokenizer(extra_text)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


# StepChat's special pieces: the original's tokenizer wrapper asserts they exist (the first six as control pieces).
_STEP_CONTROL = ("<|BOT|>", "<|EOT|>", "<|CALL_START|>", "<|CALL_END|>", "<|THINK_START|>", "<|THINK_END|>",
                 "<|MASK_1e69f|>", "<|UNMASK_1e69f|>")


def write_step_tokenizer(directory: str | Path, vocab_size: int = 120) -> Path:
    """A tiny SentencePiece model trained in code (BPE over ``_CORPUS`` and StepVideo's Chinese magic suffixes;
    unk 0, bos 1, eos 2 as StepChat's; its special pieces as control symbols), written as StepVideo ships it:
    ``<directory>/step1_chat_tokenizer.model``. No download."""
    import io

    import sentencepiece

    from fastvideo_jax.configs.pipelines.stepvideo import NEG_MAGIC, POS_MAGIC
    from fastvideo_jax.models.encoders.stepvideo_prompt import STEP_TOKENIZER_FILE

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([*_CORPUS, POS_MAGIC, NEG_MAGIC]), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        control_symbols=list(_STEP_CONTROL), minloglevel=2)
    path = Path(directory) / STEP_TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def build_bert_tokenizer():
    """A tiny ``BertTokenizer`` (BERT's special tokens first, pad 0; the words of ``_CORPUS`` and the Chinese
    characters of StepVideo's magic suffixes, which BERT splits one per character). No download."""
    import re
    import tempfile

    from transformers import BertTokenizer

    from fastvideo_jax.configs.pipelines.stepvideo import NEG_MAGIC, POS_MAGIC

    words = sorted(set(re.findall(r"[a-z]+", " ".join(_CORPUS))))
    chars = sorted(set(re.sub(r"[\sA-Za-z0-9]", "", POS_MAGIC + NEG_MAGIC)))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *chars]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.txt"
        path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
        return BertTokenizer(str(path), do_lower_case=True)


def write_bert_tokenizer(directory: str | Path):
    tokenizer = build_bert_tokenizer()
    tokenizer.save_pretrained(str(directory))
    return tokenizer
