"""Caption cleaning (LAVIS ``pre_caption``) and the Q-Former's tokenised collate."""

from __future__ import annotations

import re

import torch

# LAVIS's BlipCaptionProcessor removes exactly these characters; other punctuation (, ? - / ')
# stays and becomes its own BERT token, as in LAVIS.
_LAVIS_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_WHITESPACE = re.compile(r"\s+")


def clean_caption(caption: str, max_words: int = 50) -> str:
    """Lowercase, LAVIS's punctuation replaced by spaces, whitespace collapsed, at most ``max_words`` words.

    Same tokens as LAVIS ``pre_caption``; LAVIS collapses only runs of 2+ whitespace characters, so a
    lone tab or newline there glues two words into one for the word count. Here any whitespace run
    becomes one space.
    """
    caption = _LAVIS_PUNCTUATION.sub(" ", caption.lower())
    words = _WHITESPACE.sub(" ", caption).strip().split(" ")
    return " ".join(words[:max_words])


class QFormerTextCollate:
    """captions -> ``input_ids`` / ``attention_mask`` [B, T] long ([CLS] ... [SEP]).

    Padded to the longest caption of the batch; truncated to ``max_len`` tokens with [SEP] kept last.
    """

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer = tokenizer
        self.max_len = max_len

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}
