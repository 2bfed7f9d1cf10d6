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
