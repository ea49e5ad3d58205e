#!/usr/bin/env python
"""COCO captions (or Flickr30K) in the Karpathy split -> train/val/test shards carrying image_id.

    python data_recipes/coco_karpathy.py dataset_coco.json /data/coco /data/coco_shards --samples-per-shard 1000

INPUT is Karpathy's split file (``dataset_coco.json``; ``dataset_flickr30k.json`` works the same):
``images[]`` with ``filepath`` (COCO: ``train2014``/``val2014``; absent for Flickr30K), ``filename``,
``split`` (train | restval | val | test), ``sentences[].raw`` and ``cocoid`` (Flickr30K: ``imgid``).
IMAGE_ROOT holds the image folders (``IMAGE_ROOT/val2014/COCO_val2014_000000391895.jpg``).

Writes OUT_DIR/train (train + restval, as LAVIS trains on them: 113,287 COCO images),
OUT_DIR/val and OUT_DIR/test (5,000 images each), each with its shards and manifest.json, and
OUT_DIR/manifest.json summing them up.

Every split holds one sample per (image, caption) pair, all five captions of an image sharing its
``image_id`` (the ``cocoid``): training sees each pair, as LAVIS's coco_karpathy_train does, and
evaluation groups captions by ``image_id`` (one row per image; a hit on any of its captions), the
standard COCO / Flickr30K retrieval protocol. The price: each val/test image is stored and encoded
once per caption (5x the bytes and ViT passes of one sample per image) - simple, and the data path
needs no second sample format.
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

SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def karpathy_rows(images: list[dict]) -> dict[str, list[tuple[int, dict]]]:
    """Karpathy ``images`` -> per split (row number, {image, caption, image_id, meta}), one per caption."""
    split_of = {name: out for out, names in SPLITS.items() for name in names}
    rows: dict[str, list[tuple[int, dict]]] = {split: [] for split in SPLITS}
    number = 0
    for entry in images:
        split = split_of.get(entry.get("split"))
        if split is None:
            raise ValueError(f"image {entry.get('filename')!r} has split {entry.get('split')!r}; "
                             f"expected one of {sorted(split_of)}")
        image_id = entry.get("cocoid", entry.get("imgid"))
        if image_id is None:
            raise ValueError(f"image {entry.get('filename')!r} has neither cocoid (COCO) nor imgid (Flickr30K)")
        path = str(Path(entry.get("filepath", "")) / entry["filename"])
        for sentence_index, sentence in enumerate(entry.get("sentences", [])):
            rows[split].append((number, {"image": path, "caption": sentence["raw"], "image_id": int(image_id),
                                         "meta": {"sentence": sentence_index, "split": entry["split"]}}))
            number += 1
    return rows


def coco_karpathy_to_shards(karpathy_json: str, image_root: str, out_dir: str, samples_per_shard: int = 1000,
                            workers: int | None = None, progress: bool = True) -> dict:
    """Write the three splits; returns (and writes) OUT_DIR/manifest.json."""
    data = json.loads(Path(karpathy_json).read_text())
    if not isinstance(data, dict) or "images" not in data:
        found = sorted(data)[:10] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{karpathy_json} is not a Karpathy split file: expected a dict with 'images', "
                         f"found {found}")
    summary = {"source": str(karpathy_json), "dataset": data.get("dataset")}
    for split, rows in karpathy_rows(data["images"]).items():
        if not rows:
            summary[split] = {"samples": 0, "images": 0, "skipped": 0, "shards": 0}
            continue
        manifest = rows_to_shards(rows, str(Path(out_dir) / split), image_root, samples_per_shard, workers,
                                  progress, f"{karpathy_json} ({split})")
        skipped = {entry["line"] for entry in manifest["skipped"]}
        images = len({row["image_id"] for number, row in rows if number not in skipped})
        summary[split] = {"samples": manifest["samples"], "images": images,
                          "skipped": manifest["num_skipped"], "shards": manifest["shards"]}
    (Path(out_dir) / "manifest.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("karpathy_json", help="dataset_coco.json (or dataset_flickr30k.json)")
    parser.add_argument("image_root", help="folder holding the image paths of the json (filepath/filename)")
    parser.add_argument("out_dir")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    summary = coco_karpathy_to_shards(args.karpathy_json, args.image_root, args.out_dir, args.samples_per_shard,
                                      args.workers)
    for split in SPLITS:
        s = summary[split]
        print(f"{split}: {s['samples']} samples ({s['images']} images) in {s['shards']} shards, "
              f"{s['skipped']} skipped (reasons in {Path(args.out_dir) / split / 'manifest.json'})")
    return summary


if __name__ == "__main__":
    main()
