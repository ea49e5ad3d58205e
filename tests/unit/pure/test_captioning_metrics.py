"""Captioning metrics: the pure-Python PTB tokenisation, corpus BLEU-4 (closest-reference brevity
penalty) checked against hand-computed values, and CIDEr-D against its formula written out."""

import math
from collections import Counter

import pytest

from blip2_train.metrics.captioning import caption_metrics, ptb_tokenize


@pytest.mark.parametrize("text, tokens", [
    ("A man riding a horse.", "a man riding a horse"),
    ("A man's T-shirt, (red)!", "a man 's t-shirt red"),
    ("I don't know... it's 3.5 m at 3:30 in the U.S.", "i do n't know it 's 3.5 m at 3:30 in the u.s."),
    ('"Hello" -- she said; ok?', "hello she said ok"),
    ("dogs' toys\nin a row", "dogs toys in a row"),
])
def test_ptb_tokenize_lowercases_and_drops_coco_punctuation(text, tokens):
    assert ptb_tokenize(text) == tokens


def bleu4(candidate, refs):
    return caption_metrics({0: candidate}, {0: refs})["bleu4"]


def test_identical_caption_scores_bleu4_one():
    assert bleu4("a large red circle at the top", ["A large red circle at the top."]) == pytest.approx(1.0, abs=1e-6)


def test_bleu4_hand_computed_precisions():
    # clipped n-gram precisions 6/7, 4/6, 3/5, 2/4; candidate (7) longer than reference (6): no penalty
    got = bleu4("a dog runs on the green grass", ["a dog runs on the grass"])
    assert got == pytest.approx((6 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25, rel=1e-6)


def test_bleu4_brevity_penalty_uses_the_closest_reference():
    # all n-grams match; length 5, closest reference 6 (not 8): BP = exp(1 - 6/5)
    got = bleu4("a dog runs on the", ["a dog runs on the grass", "a dog runs on the green grass today"])
    assert got == pytest.approx(math.exp(1 - 6 / 5), rel=1e-6)
    # a tie (4 and 6 both 1 away from 5) picks the shorter reference: no penalty
    got = bleu4("a dog runs on grass", ["a dog runs on", "a dog runs on the grass"])
    assert got == pytest.approx((1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, rel=1e-6)


def test_bleu4_is_a_corpus_score_not_a_mean_of_sentences():
    preds = {"a": "a dog runs on the green grass", "b": "a dog runs on the"}
    refs = {"a": ["a dog runs on the grass"], "b": ["a dog runs on the grass", "a dog runs on the green grass today"]}
    # summed counts: 11/12, 8/10, 6/8, 4/6; lengths 12 vs closest references 6 + 6: no penalty
    assert caption_metrics(preds, refs)["bleu4"] == pytest.approx((11 / 12 * 8 / 10 * 6 / 8 * 4 / 6) ** 0.25, rel=1e-6)


def cider_d_formula(cands: dict, refs: dict, n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015, as coco-caption computes it), written out independently."""
    def grams(tokens, k):
        return Counter(tuple(tokens[i:i + k]) for i in range(len(tokens) - k + 1))

    df = Counter()
    for rs in refs.values():
        df.update({g for r in rs for k in range(1, n + 1) for g in grams(r.split(), k)})
    log_images = math.log(len(refs))

    def tfidf(tokens, k):
        return {g: tf * (log_images - math.log(max(1.0, df[g]))) for g, tf in grams(tokens, k).items()}

    total = 0.0
    for i, cand in cands.items():
        c = cand.split()
        per_n = [0.0] * n
        for ref in refs[i]:
            r = ref.split()
            for k in range(1, n + 1):
                vc, vr = tfidf(c, k), tfidf(r, k)
                nc, nr = math.sqrt(sum(v * v for v in vc.values())), math.sqrt(sum(v * v for v in vr.values()))
                if nc and nr:
                    dot = sum(min(v, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, v in vc.items())
                    per_n[k - 1] += dot / (nc * nr) * math.exp(-((len(c) - len(r)) ** 2) / (2 * sigma ** 2))
        total += 10.0 * sum(per_n) / n / len(refs[i])
    return total / len(cands)


REFS = {1: ["a large red circle at the top on a green background", "a big red circle near the top"],
        2: ["a small blue bar at the bottom on a white background"],
        3: ["a yellow ring in the middle on a black background", "a yellow ring, in the middle."]}


def test_cider_matches_its_formula_on_a_small_corpus():
    preds = {1: "a red circle at the top on a green background", 2: "a small blue bar on a white background",
             3: "a yellow circle in the middle"}
    tokenized = {i: [ptb_tokenize(r) for r in rs] for i, rs in REFS.items()}
    expected = cider_d_formula({i: ptb_tokenize(p) for i, p in preds.items()}, tokenized)
    assert caption_metrics(preds, REFS)["cider"] == pytest.approx(expected, rel=1e-9)


def test_cider_perfect_match_is_positive_and_a_wrong_caption_scores_lower():
    perfect = {i: rs[0] for i, rs in REFS.items()}
    wrong = {**perfect, 2: "a large red circle at the top"}
    assert caption_metrics(perfect, REFS)["cider"] > 1.0
    assert caption_metrics(wrong, REFS)["cider"] < caption_metrics(perfect, REFS)["cider"]
    assert caption_metrics(wrong, REFS)["bleu4"] < caption_metrics(perfect, REFS)["bleu4"]


def test_empty_captions_score_zero_and_missing_references_fail():
    scores = caption_metrics({1: "", 2: "..."}, REFS)
    assert scores["cider"] == 0.0 and scores["bleu4"] < 1e-6
    assert caption_metrics({}, {}) == {"bleu4": 0.0, "cider": 0.0}
    with pytest.raises(ValueError, match="no reference"):
        caption_metrics({9: "a dog"}, REFS)
