"""Captioning metrics without Java: coco-caption's BLEU-4 and CIDEr-D.

The scores come from pycocoevalcap's own scorers (the reference code every captioning paper
reports; pure Python): corpus BLEU with the closest-reference-length brevity penalty, and CIDEr-D
(n = 1..4, Gaussian length penalty sigma = 6, clipped counts, document frequencies from the
references of the evaluated set, x10). Only coco-caption's tokeniser needs Java (Stanford
PTBTokenizer); ``ptb_tokenize`` stands in for it in pure Python: lowercase, PTB splitting of
punctuation and contractions, then coco-caption's punctuation list removed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# coco-caption (pycocoevalcap/tokenizer/ptbtokenizer.py) drops these tokens after PTB tokenisation;
# brackets are lowercased -lrb- etc. under -lowerCase, so they are matched in lower case here.
PUNCTUATIONS = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-",
                "--", "...", ";"}

_QUOTES_AND_BRACKETS = re.compile(r"[\"“”‘’()\[\]{}<>]")  # PTB turns these into ``, '', -LRB- ...
_CONTRACTION = re.compile(r"(?<=[a-z])(n't|'s|'re|'ve|'ll|'d|'m)(?![a-z])")
_TOKEN = re.compile(r"""
    \d+(?:[.,:]\d+)+                        # 3.5  1,000  3:30
  | [a-z0-9]+(?:\.[a-z0-9]+)+\.?            # u.s.  e.g.  (an abbreviation keeps its periods)
  | n't | '(?:s|re|ve|ll|d|m)(?![a-z])      # contractions split off below
  | [^\s.,;:!?'`]+(?:'[^\s.,;:!?'`]+)*      # words, hyphens and inner apostrophes included (t-shirt, o'clock)
  | \.\.\. | -- | [.,;:!?'`]              # punctuation
""", re.VERBOSE)


def ptb_tokenize(text: str) -> str:
    """'A man's T-shirt, (red).' -> "a man 's t-shirt red": coco-caption's tokens, space-joined."""
    text = _QUOTES_AND_BRACKETS.sub(" ", text.lower().replace("\n", " "))
    text = _CONTRACTION.sub(r" \1", text)
    return " ".join(t for t in _TOKEN.findall(text) if t not in PUNCTUATIONS)


def caption_metrics(predictions: Mapping, references: Mapping) -> dict[str, float]:
    """predictions {id: caption}, references {id: [captions]} -> {"bleu4": .., "cider": ..}.

    Both are corpus scores over the ids of ``predictions``; every one of them needs references.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    ids = sorted(predictions, key=str)
    if not ids:
        return {"bleu4": 0.0, "cider": 0.0}
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(f"{len(missing)} predictions have no reference captions (ids {missing[:5]}); "
                         f"pass references for every predicted id")
    res = {i: [ptb_tokenize(predictions[i])] for i in ids}
    gts = {i: [ptb_tokenize(r) for r in references[i]] for i in ids}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}
