"""VQAv2 accuracy, written from the published description of the official evaluation.

An answer is right to the degree that annotators gave it: ``min(#annotators who gave it / 3, 1)``,
averaged over the n leave-one-out subsets of the n annotators' answers (n = 10 in VQAv2), so that
one annotator's slip never decides the score. With m of n answers matching the prediction:
``(m * min((m - 1) / 3, 1) + (n - m) * min(m / 3, 1)) / n``; for n = 10: m = 1 -> 0.3, 2 -> 0.6,
3 -> 0.9, 4 or more -> 1.

Before comparison every answer (prediction and annotators') is normalised as the evaluation
describes: lower case; punctuation other than apostrophes and colons replaced by a space (a comma
between digits dropped: 1,000 -> 1000; a period ends a word unless it is a decimal point); number
words to digits ("two" -> "2", "none" -> "0"); articles (a, an, the) removed; contractions missing
their apostrophe restored ("dont" -> "don't"); whitespace collapsed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# words written without their apostrophe -> the contraction (the common English ones)
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "shant": "shan't", "shed": "she'd", "shes": "she's", "shouldnt": "shouldn't",
    "shouldve": "should've", "thats": "that's", "thered": "there'd", "theres": "there's", "theyd": "they'd",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "wed": "we'd",
    "weve": "we've", "werent": "weren't", "whats": "what's", "whered": "where'd", "wheres": "where's",
    "whod": "who'd", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyd": "why'd", "whys": "why's",
    "wont": "won't", "wouldnt": "wouldn't", "wouldve": "would've", "yall": "y'all", "youd": "you'd",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")  # 1,000 -> 1000
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # every period but the one in 3.5
_PUNCTUATION = re.compile(r"[!\"#$%&()*+,\-/;<=>?@\[\\\]^_`{|}~]")  # not ' or : (kept, as the evaluation does)


def normalize_answer(answer: str) -> str:
    """'The two Dogs.' -> '2 dogs'; 'dont' -> "don't"; ' Yes! ' -> 'yes'."""
    text = answer.lower().replace("\n", " ").replace("\t", " ")
    text = _DIGIT_COMMA.sub("", text)
    text = _NON_DECIMAL_PERIOD.sub(" ", text)
    text = _PUNCTUATION.sub(" ", text)
    words = []
    for word in text.split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One question's accuracy in [0, 1]: leave-one-out average of min(#matches / 3, 1)."""
    if not answers:
        raise ValueError("vqa_accuracy needs the annotators' answers; got none")
    pred = normalize_answer(prediction)
    matches = sum(normalize_answer(a) == pred for a in answers)
    n = len(answers)
    if n == 1:  # nothing to leave out: the one answer decides (min(1/3, 1) would cap a lone match)
        return float(matches)
    # leaving out a matching answer leaves m - 1 matches, leaving out another leaves m
    return (matches * min((matches - 1) / 3, 1.0) + (n - matches) * min(matches / 3, 1.0)) / n


def vqa_score(predictions: Mapping, answers: Mapping) -> float:
    """Mean accuracy over the ids of ``predictions``; ``answers`` {id: [annotators' answers]}."""
    if not predictions:
        return 0.0
    missing = [k for k in predictions if not answers.get(k)]
    if missing:
        raise ValueError(f"{len(missing)} predictions have no annotator answers (ids {missing[:5]}); pass "
                         f"answers for every predicted id")
    return sum(vqa_accuracy(predictions[k], answers[k]) for k in predictions) / len(predictions)


def most_common_answer(answers: Iterable[str]) -> str:
    """The normalised answer most annotators gave (ties: the first given)."""
    counts = Counter(normalize_answer(a) for a in answers)
    if not counts:
        raise ValueError("most_common_answer needs at least one answer")
    return counts.most_common(1)[0][0]


def majority_baseline(train_answers: Iterable[Sequence[str]], val_answers: Mapping,
                      groups: Mapping | None = None, train_groups: Iterable | None = None) -> float:
    """VQA accuracy of always answering the training set's most frequent answer.

    With ``groups`` ({val id: group}) and ``train_groups`` (one group per training question, e.g. the
    question type), each group answers its own most frequent training answer: the stronger prior.
    """
    train_answers = list(train_answers)
    overall = Counter(most_common_answer(a) for a in train_answers).most_common(1)[0][0]
    per_group: dict = {}
    if groups is not None:
        by_group: dict = {}
        for group, answers in zip(train_groups, train_answers):
            by_group.setdefault(group, Counter())[most_common_answer(answers)] += 1
        per_group = {g: c.most_common(1)[0][0] for g, c in by_group.items()}
    predictions = {k: per_group.get(groups[k], overall) if groups is not None else overall for k in val_answers}
    return vqa_score(predictions, val_answers)
