#!/usr/bin/env python
"""Count the samples of a shard directory and how many of the source rows were lost.

    python data_recipes/check_shards.py OUT_DIR [--decode] [--max-failed-rate 0.3]

For an img2dataset output (CC3M, CC12M, LAION parquet of url + caption) it sums the per-shard
``{shard}_stats.json`` files (``count`` rows tried, ``successes``, ``failed_to_download``,
``failed_to_resize``, ``status_dict``: the reasons) into the failed rate of the download. It then
reads every ``.tar`` and counts complete samples (an image jpg|jpeg|png|webp and a non-empty txt
under one key), incomplete ones and unreadable tars; ``--decode`` also opens every image (slow).
It prints a JSON report and exits 1 when a tar is unreadable, when the tars hold fewer samples than
the stats files promise, or when the failed rate passes ``--max-failed-rate``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def check_tar(args: tuple[str, bool]) -> dict:
    """One tar -> {samples, incomplete, undecodable, error}: members grouped by key (text before the first dot)."""
    path, decode = args
    members: dict[str, dict[str, bytes | None]] = {}
    report = {"shard": path, "samples": 0, "incomplete": 0, "undecodable": 0, "error": None}
    try:
        with tarfile.open(path) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, ext = os.path.basename(info.name).partition(".")
                wanted = ext == "txt" or (decode and ext in IMAGE_EXTS)
                data = tar.extractfile(info).read() if wanted else None
                members.setdefault(key, {})[ext] = data
    except (tarfile.TarError, OSError, EOFError) as err:
        report["error"] = f"{err.__class__.__name__}: {err}"
    for parts in members.values():
        image_ext = next((e for e in IMAGE_EXTS if e in parts), None)
        caption = (parts.get("txt") or b"").strip()
        if image_ext is None or not caption:
            report["incomplete"] += 1
            continue
        if decode:
            from PIL import Image

            try:
                with Image.open(io.BytesIO(parts[image_ext])) as image:
                    image.load()
            except Exception:  # noqa: BLE001 - PIL raises many types for broken files
                report["undecodable"] += 1
                continue
        report["samples"] += 1
    return report


def read_stats(out_dir: Path) -> dict | None:
    """img2dataset's ``*_stats.json`` summed; None when there are none (not an img2dataset output)."""
    files = sorted(out_dir.glob("*_stats.json"))
    if not files:
        return None
    total = {"stats_files": len(files), "count": 0, "successes": 0, "failed_to_download": 0,
             "failed_to_resize": 0}
    reasons: Counter = Counter()
    for path in files:
        stats = json.loads(path.read_text())
        for name in ("count", "successes", "failed_to_download", "failed_to_resize"):
            total[name] += int(stats.get(name, 0))
        reasons.update({k: int(v) for k, v in (stats.get("status_dict") or {}).items()})
    total["failed_rate"] = (total["count"] - total["successes"]) / total["count"] if total["count"] else 0.0
    total["reasons"] = dict(reasons.most_common(10))
    return total


def check_shards(out_dir: str, decode: bool = False, workers: int | None = None, progress: bool = True) -> dict:
    from tqdm import tqdm

    root = Path(out_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{out_dir} is not a directory")
    tars = sorted(str(p) for p in root.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"{out_dir} holds no .tar files (found: {sorted(os.listdir(root))[:10]})")
    workers = workers or max(1, min(len(tars), os.cpu_count() or 1))
    totals = {"shards": len(tars), "samples": 0, "incomplete": 0, "undecodable": 0, "unreadable_shards": []}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for shard in tqdm(pool.map(check_tar, [(t, decode) for t in tars]), total=len(tars), desc="shards",
                          disable=not progress):
            for name in ("samples", "incomplete", "undecodable"):
                totals[name] += shard[name]
            if shard["error"]:
                totals["unreadable_shards"].append({"shard": shard["shard"], "error": shard["error"]})
    report = {"dir": str(root), "tars": totals, "img2dataset": read_stats(root)}
    problems = [f"{len(totals['unreadable_shards'])} unreadable tar(s)"] if totals["unreadable_shards"] else []
    stats = report["img2dataset"]
    if stats is not None and totals["samples"] < stats["successes"]:
        problems.append(f"the tars hold {totals['samples']} complete samples, the stats files "
                        f"{stats['successes']} successes")
    report["problems"] = problems
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--decode", action="store_true", help="open every image too (slow)")
    parser.add_argument("--max-failed-rate", type=float, default=None,
                        help="exit 1 when more than this fraction of the source rows failed")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    report = check_shards(args.out_dir, args.decode, args.workers)
    stats = report["img2dataset"]
    if args.max_failed_rate is not None and stats is not None and stats["failed_rate"] > args.max_failed_rate:
        report["problems"].append(f"failed rate {stats['failed_rate']:.3f} > --max-failed-rate "
                                  f"{args.max_failed_rate}")
    print(json.dumps(report, indent=2))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
