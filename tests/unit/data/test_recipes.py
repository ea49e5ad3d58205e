"""data_recipes/jsonl_to_shards.py: rows -> shards the data path reads, bad rows in the manifest."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from blip2_train.data import expand_urls

REPO = Path(__file__).resolve().parents[3]


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
                          capture_output=True, text=True, timeout=300, check=False)
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


# ------------------------------------------------------------------------------ COCO (Karpathy split)
def _karpathy(tmp_path):
    """3 train + 1 restval + 2 val + 1 test images, 5 captions each (val image 2 has 4), COCO layout."""
    images, entries = tmp_path / "coco", []
    for folder in ("train2014", "val2014"):
        (images / folder).mkdir(parents=True)
    splits = ["train", "train", "train", "restval", "val", "val", "test"]
    for i, split in enumerate(splits):
        folder = "train2014" if split == "train" else "val2014"
        name = f"COCO_{folder}_{i:012d}.jpg"
        Image.new("RGB", (24, 16), (i * 30, 90, 0)).save(images / folder / name)
        count = 4 if i == 5 else 5
        entries.append({"filepath": folder, "filename": name, "split": split, "cocoid": 1000 + i, "imgid": i,
                        "sentences": [{"raw": f"Image {i}, caption {k}.", "tokens": []} for k in range(count)]})
    (images / "val2014" / entries[4]["filename"]).write_bytes(b"broken")  # a val image that cannot decode
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path, images


def test_coco_karpathy_recipe_writes_splits_with_five_captions_sharing_image_id(tmp_path):
    from data_recipes.check_shards import check_shards
    from data_recipes.coco_karpathy import coco_karpathy_to_shards

    karpathy, images = _karpathy(tmp_path)
    out = tmp_path / "shards"
    summary = coco_karpathy_to_shards(str(karpathy), str(images), str(out), samples_per_shard=4, workers=1,
                                      progress=False)
    assert summary["train"] == {"samples": 20, "images": 4, "skipped": 0, "shards": 5}  # train + restval
    assert summary["val"] == {"samples": 4, "images": 1, "skipped": 5, "shards": 3}  # image 4 broken
    assert summary["test"] == {"samples": 5, "images": 1, "skipped": 0, "shards": 2}
    val_manifest = json.loads((out / "val" / "manifest.json").read_text())
    assert len(val_manifest["skipped"]) == 5 and all("val2014/COCO_val2014_000000000004.jpg" == s["image"]
                                                       for s in val_manifest["skipped"])
    import webdataset as wds

    test = list(wds.DataPipeline(wds.SimpleShardList(expand_urls(str(out / "test"))), wds.tarfile_to_samples()))
    metas = [json.loads(s["json"]) for s in test]
    assert [m["image_id"] for m in metas] == [1006] * 5 and [m["sentence"] for m in metas] == list(range(5))
    assert [s["txt"].decode() for s in test] == [f"Image 6, caption {k}." for k in range(5)]
    assert len({s["jpg"] for s in test}) == 1  # the same image bytes under each caption
    assert check_shards(str(out / "train"), decode=True, workers=1, progress=False)["tars"]["samples"] == 20


def test_coco_karpathy_recipe_runs_as_a_script_and_names_a_wrong_file(tmp_path):
    karpathy, images = _karpathy(tmp_path)
    script = str(REPO / "data_recipes" / "coco_karpathy.py")
    done = subprocess.run([sys.executable, script, str(karpathy), str(images), str(tmp_path / "out"),
                           "--samples-per-shard", "10", "--workers", "1"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "test: 5 samples (1 images) in 1 shards, 0 skipped" in done.stdout
    (tmp_path / "wrong.json").write_text(json.dumps({"annotations": [], "info": {}}))
    done = subprocess.run([sys.executable, script, str(tmp_path / "wrong.json"), str(images), str(tmp_path / "o2")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1 and "not a Karpathy split file" in done.stderr and "['annotations', 'info']" in done.stderr


# --------------------------------------------------------------------- img2dataset output (CC3M, LAION)
def _fake_img2dataset_output(out):
    """What img2dataset --output_format webdataset writes: {shard}.tar + {shard}_stats.json (+ .parquet)."""
    import io
    import tarfile

    out.mkdir()
    for shard, (count, good) in enumerate([(10, 8), (10, 6)]):
        with tarfile.open(out / f"{shard:05d}.tar", "w") as tar:
            for i in range(good):
                buffer = io.BytesIO()
                Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(buffer, format="JPEG")
                key = f"{shard:05d}{i:04d}"
                for name, data in ((f"{key}.jpg", buffer.getvalue()), (f"{key}.txt", f"caption {i}".encode()),
                                   (f"{key}.json", json.dumps({"url": f"http://x/{i}", "key": key}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        stats = {"count": count, "successes": good, "failed_to_download": count - good - 1, "failed_to_resize": 1,
                 "duration": 1.0, "status_dict": {"success": good, "<urlopen error timed out>": count - good - 1,
                                                  "image decoding error": 1}}
        (out / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    (out / "00000.parquet").write_bytes(b"PAR1")  # ignored


def test_check_shards_counts_samples_and_the_failed_rate_of_img2dataset(tmp_path):
    _fake_img2dataset_output(tmp_path / "cc3m")
    script = str(REPO / "data_recipes" / "check_shards.py")
    done = subprocess.run([sys.executable, script, str(tmp_path / "cc3m"), "--workers", "1"], capture_output=True, check=False,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["tars"] == {"shards": 2, "samples": 14, "incomplete": 0, "undecodable": 0, "unreadable_shards": []}
    stats = report["img2dataset"]
    assert (stats["count"], stats["successes"], stats["failed_to_download"], stats["failed_to_resize"]) == (20, 14, 4, 2)
    assert stats["failed_rate"] == 0.3 and stats["reasons"]["<urlopen error timed out>"] == 4
    done = subprocess.run([sys.executable, script, str(tmp_path / "cc3m"), "--max-failed-rate", "0.25",
                           "--workers", "1"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1 and "failed rate 0.300 > --max-failed-rate 0.25" in done.stdout


def test_check_shards_reports_truncated_tars_and_incomplete_samples(tmp_path):
    from data_recipes.check_shards import check_shards

    _fake_img2dataset_output(tmp_path / "d")
    data = (tmp_path / "d" / "00001.tar").read_bytes()
    (tmp_path / "d" / "00001.tar").write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    (tmp_path / "d" / "00000.tar").unlink()
    import io
    import tarfile

    with tarfile.open(tmp_path / "d" / "00002.tar", "w") as tar:
        for name, data in (("a.jpg", b"\xff\xd8 not a jpeg"), ("a.txt", b"x"), ("b.jpg", b"x"), ("c.txt", b"y")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report = check_shards(str(tmp_path / "d"), decode=True, workers=1, progress=False)
    tars = report["tars"]
    assert tars["incomplete"] == 2 and tars["undecodable"] == 1 and 0 < tars["samples"] < 6
    assert [u["shard"].rsplit("/", 1)[-1] for u in tars["unreadable_shards"]] == ["00001.tar"]
    assert "1 unreadable tar(s)" in report["problems"] and "the tars hold" in report["problems"][1]
