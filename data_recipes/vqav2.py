#!/usr/bin/env python
"""VQAv2 questions + annotations (+ COCO images) -> VQA shards with question, answers and ids.

    python data_recipes/vqav2.py v2_OpenEnded_mscoco_train2014_questions.json \\
        v2_mscoco_train2014_annotations.json /data/coco /data/vqav2/train --samples-per-shard 1000

QUESTIONS is VQAv2's questions file: ``questions[]`` of ``{image_id, question, question_id}`` and
``data_subtype`` (train2014 | val2014, the COCO folder). ANNOTATIONS is its annotations file:
``annotations[]`` of ``{question_id, answers[{answer, ...}] (10 annotators), multiple_choice_answer,
answer_type, question_type}``. IMAGE_ROOT holds the COCO folders
(``IMAGE_ROOT/train2014/COCO_train2014_000000000009.jpg``).

Writes OUT_DIR/00000.tar, ... (one sample per question: the image, ``{key}.txt`` = the question,
``{key}.json`` = question, answers (all 10), question_id, image_id, answer_type, question_type) and
OUT_DIR/manifest.json (samples, questions without annotation, skipped rows with their reason). The
images of an image's several questions are stored once per question, as coco_karpathy.py stores
them once per caption. Visual Genome QA (the paper's second VQA source) goes through
jsonl_to_shards.py: one row per question with its single answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    from data_recipes.jsonl_to_shards import rows_to_shards
except ImportError:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from data_recipes.jsonl_to_shards import rows_to_shards


def _load(path: str, key: str, what: str) -> dict:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or key not in data:
        found = sorted(data)[:10] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not a VQAv2 {what} file: expected a dict with {key!r}, found {found}")
    return data


def vqav2_rows(questions: dict, annotations: dict) -> tuple[list[tuple[int, dict]], int]:
    """(row number, {image, question, answers, question_id, image_id, meta}) per annotated question, and
    how many questions had no annotation."""
    subtype = questions.get("data_subtype") or annotations.get("data_subtype")
    if not subtype:
        raise ValueError("the questions file names no data_subtype (train2014 | val2014): the COCO folder is "
                         "unknown")
    by_id = {a["question_id"]: a for a in annotations["annotations"]}
    rows, unannotated = [], 0
    for number, q in enumerate(questions["questions"]):
        ann = by_id.get(q["question_id"])
        if ann is None:
            unannotated += 1
            continue
        image = f"{subtype}/COCO_{subtype}_{int(q['image_id']):012d}.jpg"
        rows.append((number, {"image": image, "question": q["question"], "image_id": int(q["image_id"]),
                              "question_id": q["question_id"], "answers": [a["answer"] for a in ann["answers"]],
                              "meta": {"answer_type": ann.get("answer_type"),
                                       "question_type": ann.get("question_type")}}))
    return rows, unannotated


def vqav2_to_shards(questions_json: str, annotations_json: str, image_root: str, out_dir: str,
                    samples_per_shard: int = 1000, workers: int | None = None, progress: bool = True) -> dict:
    """Write the shards; returns (and writes) OUT_DIR/manifest.json."""
    questions = _load(questions_json, "questions", "questions")
    annotations = _load(annotations_json, "annotations", "annotations")
    rows, unannotated = vqav2_rows(questions, annotations)
    if not rows:
        raise ValueError(f"no question of {questions_json} has an annotation in {annotations_json}: do the "
                         f"files belong to the same split?")
    manifest = rows_to_shards(rows, out_dir, image_root, samples_per_shard, workers, progress,
                              f"{questions_json} + {annotations_json}")
    manifest["questions"] = len(questions["questions"])
    manifest["unannotated_questions"] = unannotated
    (Path(out_dir) / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("questions_json")
    parser.add_argument("annotations_json")
    parser.add_argument("image_root", help="folder holding the COCO image folders (train2014/, val2014/)")
    parser.add_argument("out_dir")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    manifest = vqav2_to_shards(args.questions_json, args.annotations_json, args.image_root, args.out_dir,
                               args.samples_per_shard, args.workers)
    print(f"{manifest['samples']} questions in {manifest['shards']} shards, {manifest['num_skipped']} skipped, "
          f"{manifest['unannotated_questions']} without annotation (reasons in "
          f"{Path(args.out_dir) / 'manifest.json'})")
    return manifest


if __name__ == "__main__":
    main()
