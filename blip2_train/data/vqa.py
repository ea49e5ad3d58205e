"""VQA samples: decode ``{key}.json``'s question and annotators' answers; tokenise for the Q-Former and LLM.

A VQA shard holds per key an image, ``{key}.json`` with ``question`` (str) and ``answers`` (every
annotator's answer, a list of str; repeats are what weight an answer), and optionally ``{key}.txt``
(the question again, for caption tooling). ``question_id`` (else ``image_id``) names a prediction.

Answer weighting: training samples **one** answer per question and step, a uniformly drawn annotator's
answer, i.e. each distinct answer with probability (its count / number of answers). The expected loss
is the count-weighted loss, at the cost of one target sequence per question (a loss over every
distinct answer would cost up to 10, and VQAv2's answers are mostly short and shared); answers are
normalised first (``metrics/vqa.py``) so "two" and "2" count as one. Validation's target is the most
common normalised answer (deterministic).
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator

import torch
from PIL import Image

from blip2_train.data.stages import IMAGE_EXTS, DataLayoutError, DecodeSamples, sample_image_id
from blip2_train.metrics.vqa import most_common_answer, normalize_answer


def read_question(meta: bytes | None) -> tuple[str, list[str]] | str:
    """(question, answers) from a sample's json bytes, or the reason it is unusable."""
    if not meta:
        return "no json (VQA samples carry question and answers in {key}.json)"
    try:
        record = json.loads(meta)
    except ValueError as err:
        return f"invalid json ({err})"
    question, answers = record.get("question"), record.get("answers")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(question, str) or not question.strip():
        return f"json has no question (keys: {sorted(record)[:10]})"
    if not isinstance(answers, list) or not [a for a in answers if isinstance(a, str) and a.strip()]:
        return f"json has no answers (a list of str; keys: {sorted(record)[:10]})"
    return question.strip(), [a for a in answers if isinstance(a, str) and a.strip()]


def sample_question_id(meta: bytes | None, url: str, key: str) -> str:
    try:
        record = json.loads(meta) if meta else {}
    except ValueError:
        record = {}
    value = record.get("question_id") if isinstance(record, dict) else None
    return str(value) if value is not None else str(key)


class DecodeVQASamples(DecodeSamples):
    """Raw tar samples -> ``{image, caption (= question), question, answers, image_id, key}``; bad ones
    skipped and counted, as DecodeSamples does for captions, with the same private augmentation RNG."""

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        counter = self.counter
        state = self._rng_state()
        for sample in samples:
            key, url = sample.get("__key__"), sample.get("__url__")
            image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
            parsed = read_question(sample.get("json"))
            if image_ext is None or isinstance(parsed, str):
                members = sorted(k for k in sample if not k.startswith("__"))
                reason = f"no image (members: {members})" if image_ext is None else parsed
                counter.skip(reason, url, key, members)
                continue
            try:
                with Image.open(io.BytesIO(sample[image_ext])) as image:
                    pixels, state = self._transform(image.convert("RGB"), state)  # [3, H, W]
            except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
                counter.skip(f"undecodable image ({err.__class__.__name__}: {err})", url, key)
                continue
            counter.good_sample()
            question, answers = parsed
            yield {"image": pixels, "caption": question, "question": question, "answers": answers,
                   "image_id": sample_image_id(sample.get("json"), url, key),
                   "key": sample_question_id(sample.get("json"), url, key)}
        if self.finite and counter.good == 0:
            if counter.in_a_row:
                raise counter.layout_error("(all val shards)")
            raise DataLayoutError(f"the validation shards could not be read ({counter.last_reason})"
                                  if counter.last_reason else "the validation shards hold no samples")


def format_prompt(template: str, question: str) -> str:
    """``vqa.prompt`` with the question in its ``{}``."""
    return template.replace("{}", question)


class VQACollate:
    """VQA samples -> Q-Former question tokens and LLM tokens with the answer as target.

    Q-Former (``qformer_tokenizer`` given): ``input_ids`` / ``attention_mask`` [B, Tq] of the question.
    Decoder-only LLM: text = prompt(question) + " " + answer + "\\n"; labels -100 on BOS, the prompt
    and padding (the prompt's length is counted per row: questions differ). Encoder-decoder: encoder
    text = prompt(question), decoder target = answer (+ </s>). Also ``answers`` (all annotators') and
    ``question`` lists for evaluation.
    """

    wants_samples = True  # BatchSamples hands over whole samples, not only captions

    def __init__(self, llm_tokenizer, decoder_only: bool, prompt: str, max_len: int, qformer_tokenizer=None,
                 max_question_len: int = 35, seed: int = 0, deterministic: bool = False):
        if "{}" not in prompt:
            raise ValueError(f"vqa.prompt={prompt!r} has no {{}} for the question, e.g. 'Question: {{}} Short answer:'")
        self.llm_tokenizer, self.decoder_only, self.prompt, self.max_len = llm_tokenizer, decoder_only, prompt, max_len
        self.qformer_tokenizer, self.max_question_len = qformer_tokenizer, max_question_len
        self.seed, self.deterministic = seed, deterministic
        self._rng: random.Random | None = None

    def targets(self, samples: list[dict]) -> list[str]:
        if self.deterministic:
            return [most_common_answer(s["answers"]) for s in samples]
        if self._rng is None:  # one stream per worker process
            info = torch.utils.data.get_worker_info()
            self._rng = random.Random(f"vqa-{self.seed}-{info.id if info else 0}")
        return [normalize_answer(self._rng.choice(s["answers"])) for s in samples]

    def __call__(self, samples: list[dict]) -> dict:
        questions = [s["question"] for s in samples]
        answers = self.targets(samples)
        prompts = [format_prompt(self.prompt, q) for q in questions]
        tok = self.llm_tokenizer
        tok.padding_side = "right"
        out = {"question": questions, "answers": [list(s["answers"]) for s in samples], "target_answer": answers}
        if self.qformer_tokenizer is not None:
            enc = self.qformer_tokenizer(questions, padding="longest", truncation=True,
                                         max_length=self.max_question_len, return_tensors="pt")
            out["input_ids"], out["attention_mask"] = enc["input_ids"].long(), enc["attention_mask"].long()
        if self.decoder_only:
            enc = tok([p + " " + a + "\n" for p, a in zip(prompts, answers)], padding="longest", truncation=True,
                      max_length=self.max_len, return_tensors="pt")
            prompt_lens = torch.tensor([len(ids) for ids in tok(prompts)["input_ids"]])  # BOS + prompt
            positions = torch.arange(enc["input_ids"].shape[1])
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            labels = labels.masked_fill(positions[None, :] < prompt_lens[:, None], -100)
            out.update(llm_input_ids=enc["input_ids"], llm_attention_mask=enc["attention_mask"], llm_labels=labels)
            return out
        enc = tok(prompts, padding="longest", truncation=True, max_length=self.max_len, return_tensors="pt")
        dec = tok(answers, padding="longest", truncation=True, max_length=self.max_len, return_tensors="pt")
        out.update(llm_input_ids=enc["input_ids"], llm_attention_mask=enc["attention_mask"],
                   llm_labels=dec["input_ids"].masked_fill(dec["attention_mask"] == 0, -100),
                   llm_decoder_attention_mask=dec["attention_mask"])
        return out
