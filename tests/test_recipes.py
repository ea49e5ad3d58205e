"""data_recipes/jsonl_to_shards.py: rows -> shards the data path reads, bad rows in the manifest."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from blip2_train.data import expand_urls

REPO = Path(__file__).resolve().parent.parent


def test_jsonl_to_shards_writes_readable_shards_and_reports_skips(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(7):
        name = f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.new("RGB", (20, 20), (i * 30, 0, 0)).save(images / name)
        rows.append({"image": name, "caption": f"a red square number {i}", "image_id": 100 + i})
    Image.new("RGB", (20, 20)).save(images / "x.bmp")
    rows.append({"image": "x.bmp", "caption": "a bitmap"})  # re-encoded as jpg
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    rows.append({"image": "broken.jpg", "caption": "broken"})
    rows.append({"image": "missing.jpg", "caption": "gone"})
    rows.append({"image": "img0.jpg", "caption": ""})
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    done = subprocess.run([sys.executable, str(REPO / "data_recipes" / "jsonl_to_shards.py"), str(tmp_path / "in.jsonl"),
                           str(out), "--image-root", str(images), "--samples-per-shard", "3", "--workers", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 8 and manifest["shards"] == 4 and manifest["num_skipped"] == 4
    reasons = {s["line"]: s["reason"] for s in manifest["skipped"]}
    assert "FileNotFoundError" in reasons[9] and "empty caption" in reasons[10] and "JSON" in reasons[11]
    assert 8 in reasons  # the broken jpeg
    import webdataset as wds

    samples = list(wds.DataPipeline(wds.SimpleShardList(expand_urls(str(out))), wds.tarfile_to_samples()))
    assert len(samples) == 8
    first = samples[0]
    assert first["txt"] == b"a red square number 0" and json.loads(first["json"])["image_id"] == 100
    assert sum("jpg" in s for s in samples) == 5 and sum("png" in s for s in samples) == 3
