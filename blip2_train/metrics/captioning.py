"""Captioning metrics without Java: coco-caption's own BLEU and CIDEr-D scorers (pycocoevalcap)
fed by a pure-Python stand-in for its Java PTB tokenizer (lowercase, punctuation removed)."""

from __future__ import annotations

import re

# the punctuation coco-caption's PTBTokenizer drops after tokenising
_PUNCT = re.compile(r"[\"'`.,:;!?()\[\]{}\-_/\\|@#$%^&*+=<>~]")


def ptb_like_tokenize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def caption_metrics(predictions: dict, references: dict) -> dict[str, float]:
    """predictions {id: caption}, references {id: [captions]} -> {'bleu4': .., 'cider': ..}."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    ids = sorted(predictions, key=str)
    if not ids:
        return {"bleu4": 0.0, "cider": 0.0}
    res = {i: [ptb_like_tokenize(predictions[i]) or "empty"] for i in ids}
    gts = {i: [ptb_like_tokenize(r) for r in references[i]] for i in ids}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}
