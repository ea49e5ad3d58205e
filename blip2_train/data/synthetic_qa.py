"""Synthetic question-answer shards: questions about synthetic images whose answers are known.

Each image is a coloured background with 1 to 4 copies of one shape, in one colour, side by side
at one vertical position (top, middle or bottom). Each sample asks one question of five types:

    color       "what color is the shape?"        -> the shape's colour (10 colours)
    shape       "what shape is it?"               -> circle | square | triangle | cross | ring | bar
    where       "where is the shape?"             -> top | middle | bottom
    count       "how many shapes are there?"      -> 1 | 2 | 3 | 4
    background  "what color is the background?"   -> the background colour

and carries 10 annotators' answers, as VQAv2: each gives the true answer with probability
``agreement`` (0.8), in a surface form the VQA normalisation maps back ("two", "Red.", "the top"),
and otherwise a wrong answer of the same type, so the leave-one-out metric has work to do.
Shards follow the VQA layout (``docs/vqa.md``): ``{key}.png``, ``{key}.txt`` (the question, so
caption tooling still reads the set) and ``{key}.json`` with ``question``, ``answers``,
``question_id``, ``question_type``, ``answer`` (the truth) and the drawn attributes; plus
``manifest.json``. 4000 64-px samples take a few seconds.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import uuid
from pathlib import Path

from PIL import Image, ImageDraw

from blip2_train.data.synthetic import (
    COLORS,
    POSITIONS,
    SHAPES,
    _add_member,
    _draw_shape,
    publish_shards,
    read_manifest,
)

QUESTIONS = {
    "color": "what color is the shape?",
    "shape": "what shape is it?",
    "where": "where is the shape?",
    "count": "how many shapes are there?",
    "background": "what color is the background?",
}
COUNTS = (1, 2, 3, 4)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
NUM_ANSWERS = 10  # annotators per question, as VQAv2


def answer_choices(question_type: str) -> list[str]:
    """Every answer a question of this type can have."""
    return {"color": list(COLORS), "background": list(COLORS), "shape": list(SHAPES),
            "where": list(POSITIONS), "count": [str(n) for n in COUNTS]}[question_type]


def render_scene(rng: random.Random, size: int) -> tuple[Image.Image, dict]:
    """1-4 copies of one shape side by side; returns the image and its attributes."""
    background = rng.choice(list(COLORS))
    color = rng.choice([c for c in COLORS if c != background])
    shape, position, count = rng.choice(SHAPES), rng.choice(list(POSITIONS)), rng.choice(COUNTS)
    image = Image.new("RGB", (size, size), COLORS[background])
    draw = ImageDraw.Draw(image)
    r = 0.085 * size * rng.uniform(0.9, 1.1)  # four fit side by side, apart
    cy = POSITIONS[position] * size + rng.uniform(-0.04, 0.04) * size
    slot = size / 4
    first = rng.randint(0, 4 - count)  # which of four horizontal slots the row starts in
    for i in range(count):
        cx = (first + i + 0.5) * slot + rng.uniform(-0.015, 0.015) * size  # copies never touch
        _draw_shape(draw, shape, cx, cy, r, COLORS[color])
    attrs = {"background": background, "color": color, "shape": shape, "position": position, "count": count}
    return image, attrs


def true_answer(question_type: str, attrs: dict) -> str:
    return {"color": attrs["color"], "background": attrs["background"], "shape": attrs["shape"],
            "where": attrs["position"], "count": str(attrs["count"])}[question_type]


def _surface_form(answer: str, question_type: str, rng: random.Random) -> str:
    """How an annotator might write the answer: the same after VQA normalisation."""
    roll = rng.random()
    if question_type == "count" and roll < 0.3:
        return NUMBER_WORDS[int(answer)]
    if roll < 0.1:
        return answer.capitalize() + "."
    if roll < 0.15 and question_type in ("where", "shape"):
        return f"the {answer}"
    return answer


def annotator_answers(answer: str, question_type: str, rng: random.Random, agreement: float) -> list[str]:
    """NUM_ANSWERS answers: the truth with probability ``agreement``, else a wrong one of the type."""
    wrong = [a for a in answer_choices(question_type) if a != answer]
    out = []
    for _ in range(NUM_ANSWERS):
        given = answer if rng.random() < agreement else rng.choice(wrong)
        out.append(_surface_form(given, question_type, rng))
    return out


def render_qa_sample(rng: random.Random, size: int, agreement: float = 0.8) -> tuple[Image.Image, dict]:
    """One image and its question record (question, answers, question_type, answer, attributes)."""
    image, attrs = render_scene(rng, size)
    question_type = rng.choice(list(QUESTIONS))
    answer = true_answer(question_type, attrs)
    return image, {"question": QUESTIONS[question_type], "answers": annotator_answers(
        answer, question_type, rng, agreement), "question_type": question_type, "answer": answer, **attrs}


def _write_split(out_dir: Path, count: int, start_id: int, image_size: int, per_shard: int,
                 rng: random.Random, agreement: float) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    for shard_index, first in enumerate(range(0, count, per_shard)):
        with tarfile.open(out_dir / f"{shard_index:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample_id in range(start_id + first, start_id + min(first + per_shard, count)):
                image, record = render_qa_sample(rng, image_size, agreement)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG", compress_level=1)
                key = f"{sample_id:09d}"
                _add_member(tar, f"{key}.png", buffer.getvalue())
                _add_member(tar, f"{key}.txt", record["question"].encode())
                meta = {"image_id": sample_id, "question_id": sample_id, **record}
                _add_member(tar, f"{key}.json", json.dumps(meta).encode())
    return -(-count // per_shard)


def write_synthetic_qa_shards(out_dir: str | os.PathLike, num_train: int = 4000, num_val: int = 200,
                              image_size: int = 64, samples_per_shard: int = 500, seed: int = 0,
                              agreement: float = 0.8) -> dict:
    """Write ``out_dir/{train,val}/*.tar`` and ``manifest.json`` (atomically, as the caption set); returns
    the manifest."""
    if min(num_train, num_val) < 0 or samples_per_shard < 1 or image_size < 16 or not 0 < agreement <= 1:
        raise ValueError(f"need num_train, num_val >= 0, samples_per_shard >= 1, image_size >= 16, "
                         f"0 < agreement <= 1; got {num_train}, {num_val}, {samples_per_shard}, {image_size}, "
                         f"{agreement}")
    out_dir = Path(out_dir)
    params = {"num_train": num_train, "num_val": num_val, "image_size": image_size,
              "samples_per_shard": samples_per_shard, "seed": seed, "agreement": agreement, "kind": "qa"}
    existing = read_manifest(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if existing is not None and existing.get("params") == params:
            return existing
        raise FileExistsError(f"{out_dir} exists and is not a synthetic QA set with {params}: remove it or "
                              f"choose another directory")
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    rng = random.Random(seed)
    manifest = {
        "train": {"samples": num_train, "shards": _write_split(tmp / "train", num_train, 0, image_size,
                                                                samples_per_shard, rng, agreement)},
        "val": {"samples": num_val, "shards": _write_split(tmp / "val", num_val, num_train, image_size,
                                                            samples_per_shard, rng, agreement)},
        "image_size": image_size, "seed": seed, "skipped": 0, "params": params,
    }
    return publish_shards(tmp, out_dir, manifest)


def ensure_synthetic_qa_shards(cfg) -> tuple[str, str]:
    """Generate the QA set described by ``cfg`` (a SyntheticConfig) once; return its train and val dirs."""
    name = f"qa-n{cfg.num_train}-{cfg.num_val}-s{cfg.image_size}-k{cfg.samples_per_shard}-seed{cfg.seed}-v1"
    root = Path(cfg.cache_dir) / name
    if not (root / "manifest.json").exists():
        write_synthetic_qa_shards(root, cfg.num_train, cfg.num_val, cfg.image_size, cfg.samples_per_shard,
                                  cfg.seed)
    return str(root / "train"), str(root / "val")
