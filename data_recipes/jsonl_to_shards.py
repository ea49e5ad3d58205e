#!/usr/bin/env python
"""Turn a JSONL of image-caption rows into webdataset shards (img2dataset layout) + manifest.json.

    python data_recipes/jsonl_to_shards.py INPUT.jsonl OUT_DIR --image-root DIR --samples-per-shard 1000

Each row: {"image": path relative to --image-root, "caption": str, "image_id": optional int}.
A question-answer row (VQA, docs/vqa.md) has "question" and "answers" (every annotator's answer,
repeats included: they weight the answer; a lone "answer" str also works) instead of "caption",
and optionally "question_id"; its json then carries question, answers and question_id, its txt the
question.
Writes OUT_DIR/00000.tar, ... with {key}.{jpg|png|webp} + {key}.txt + {key}.json, and
OUT_DIR/manifest.json with `samples` (written), `skipped` (each with its reason) and `shards`.
Shards are written in parallel over CPU cores; image bytes are copied as they are (re-encoded
only when the format is not jpg/png/webp), after a decode check so a broken file never lands.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

EXTS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def _write_shard(args) -> tuple[int, list[dict]]:
    """Write one shard from (index, rows, image_root, out_dir); returns (written, skipped)."""
    import webdataset as wds
    from PIL import Image

    index, rows, image_root, out_dir = args
    written, skipped = 0, []
    with wds.TarWriter(str(Path(out_dir) / f"{index:05d}.tar")) as sink:
        for line_no, row in rows:
            key = f"{line_no:09d}"
            try:
                if "question" in row:
                    meta = question_meta(row)
                    caption = meta["question"]
                else:
                    caption = str(row["caption"]).strip()
                    if not caption:
                        raise ValueError("empty caption")
                    meta = {"caption": caption}
                meta["image"] = row["image"]
                if row.get("image_id") is not None:
                    meta["image_id"] = int(row["image_id"])  # a non-integer id is a skipped row
                meta.update(row.get("meta") or {})  # extra fields a recipe keeps (split, sentence id, ...)
                path = Path(image_root) / row["image"]
                data = path.read_bytes()
                with Image.open(io.BytesIO(data)) as image:
                    image.load()  # a truncated or corrupt file fails here
                    ext = EXTS.get(image.format)
                    if ext is None:  # other formats are re-encoded as JPEG
                        buffer = io.BytesIO()
                        image.convert("RGB").save(buffer, format="JPEG", quality=95)
                        data, ext = buffer.getvalue(), "jpg"
            except (OSError, ValueError, TypeError, KeyError, SyntaxError) as err:
                skipped.append({"line": line_no, "image": row.get("image") if isinstance(row, dict) else None,
                                "reason": f"{err.__class__.__name__}: {err}"})
                continue
            sink.write({"__key__": key, ext: data, "txt": caption, "json": json.dumps(meta)})
            written += 1
    return written, skipped


def question_meta(row: dict) -> dict:
    """A VQA row's json fields: question, answers (non-empty strings) and question_id when given."""
    question = str(row["question"]).strip()
    if not question:
        raise ValueError("empty question")
    answers = row.get("answers", row.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list):
        raise TypeError(f"answers must be a list of str (or answer a str), got {type(answers).__name__}")
    answers = [str(a).strip() for a in answers if str(a).strip()]
    if not answers:
        raise ValueError("no answers (a question needs at least one non-empty answer)")
    meta = {"question": question, "answers": answers}
    if row.get("question_id") is not None:
        meta["question_id"] = row["question_id"]
    return meta


def jsonl_to_shards(jsonl: str, out_dir: str, image_root: str, samples_per_shard: int = 1000,
                    workers: int | None = None, progress: bool = True) -> dict:
    """Convert and return the manifest (also written to OUT_DIR/manifest.json)."""
    rows, bad_lines = [], []
    with open(jsonl) as handle:
        for line_no, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                rows.append((line_no, json.loads(line)))
            except json.JSONDecodeError as err:
                bad_lines.append({"line": line_no, "image": None, "reason": f"invalid JSON: {err}"})
    return rows_to_shards(rows, out_dir, image_root, samples_per_shard, workers, progress, str(jsonl), bad_lines)


def rows_to_shards(rows: list[tuple[int, dict]], out_dir: str, image_root: str, samples_per_shard: int = 1000,
                   workers: int | None = None, progress: bool = True, source: str = "",
                   skipped: list[dict] | None = None) -> dict:
    """(line number, row) pairs -> OUT_DIR/{00000..}.tar + manifest.json; returns the manifest.

    ``skipped`` holds rows already rejected by the caller (they land in the manifest too).
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bad_lines = list(skipped or ())
    chunks = [rows[i:i + samples_per_shard] for i in range(0, len(rows), samples_per_shard)]
    jobs = [(i, chunk, image_root, str(out)) for i, chunk in enumerate(chunks)]
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    written, skipped = 0, list(bad_lines)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for count, bad in tqdm(pool.map(_write_shard, jobs), total=len(jobs), desc="shards", disable=not progress):
            written += count
            skipped.extend(bad)
    manifest = {"samples": written, "skipped": sorted(skipped, key=lambda s: s["line"]),
                "num_skipped": len(skipped), "shards": len(jobs), "source": source}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jsonl")
    parser.add_argument("out_dir")
    parser.add_argument("--image-root", required=True)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    manifest = jsonl_to_shards(args.jsonl, args.out_dir, args.image_root, args.samples_per_shard, args.workers)
    print(f"{manifest['samples']} samples in {manifest['shards']} shards, {manifest['num_skipped']} skipped "
          f"(reasons in {Path(args.out_dir) / 'manifest.json'})")


if __name__ == "__main__":
    main()
