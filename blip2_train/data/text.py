"""Caption cleaning (LAVIS ``pre_caption``) and the Q-Former's tokenised collate."""

from __future__ import annotations

import re

import torch


def clean_caption(caption: str, max_words: int = 50) -> str:
    """Lowercase, punctuation replaced by spaces, whitespace collapsed, at most ``max_words`` words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


class QFormerTextCollate:
    """captions -> ``input_ids`` / ``attention_mask`` ([CLS] ... [SEP]), padded to the longest."""

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer = tokenizer
        self.max_len = max_len

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
