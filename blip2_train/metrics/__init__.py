"""Evaluation metrics (captioning: BLEU-4 and CIDEr-D without Java)."""

from blip2_train.metrics.captioning import caption_metrics, ptb_tokenize

__all__ = ["caption_metrics", "ptb_tokenize"]
