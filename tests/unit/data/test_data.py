"""Data path: caption cleaning, collate, transforms, synthetic shards, loaders, bad samples, bad layouts."""

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from blip2_train.config import DataConfig, DataSourceConfig
from blip2_train.data import Blip2DataModule, expand_urls
from blip2_train.data.stages import CycledShards, DataLayoutError, sample_image_id, stable_id
from blip2_train.data.synthetic import COLORS, ensure_synthetic_shards, synthetic_dir, write_synthetic_shards
from blip2_train.data.text import QFormerTextCollate, clean_caption
from blip2_train.data.transforms import CLIP_MEAN, CLIP_STD, eval_transform, train_transform
from blip2_train.data.webdataset import skipped_fraction
from blip2_train.models.tokenization import build_qformer_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_qformer_tokenizer(None, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "set"
    write_synthetic_shards(root, num_train=60, num_val=25, image_size=32, samples_per_shard=20, seed=3)
    return root


def datamodule(tokenizer, train, val, name="webdataset", **kw):
    fields = {"name": name, "train_shards": train, "val_shards": val, "batch_size": 8, "eval_batch_size": 10,
              "num_workers": 0, "shuffle_buffer": 20, "samples_per_epoch": 40, **kw}
    cfg = OmegaConf.structured(DataConfig(**fields))
    collate = QFormerTextCollate(tokenizer, 32)
    return Blip2DataModule(cfg, image_size=32, train_text_collate=collate, eval_text_collate=collate, seed=0)


# ------------------------------------------------------------------------------------------ text
def test_clean_caption_like_lavis_pre_caption():
    assert clean_caption("A Dog!  Running (fast)... on the BEACH\n") == "a dog running fast on the beach"
    # LAVIS strips only . ! " ( ) * # : ; ~ ; commas, hyphens, apostrophes, ? and / stay
    assert clean_caption('The "cat"; a man\'s hat, re-used? yes/no ~*#') == "the cat a man's hat, re-used? yes/no"
    assert clean_caption("two\twords\n\nand  more ") == "two words and more"
    assert clean_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)
    assert clean_caption("a b c d", max_words=2) == "a b"
    assert clean_caption("...!!") == ""


def test_text_collate_pads_to_longest_and_truncates_keeping_sep(tokenizer):
    batch = QFormerTextCollate(tokenizer, max_len=6)(["a red circle", "a", "a large red circle at the top"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (3, 6)
    assert mask.sum(1).tolist() == [5, 3, 6]
    assert ids[:, 0].tolist() == [tokenizer.cls_token_id] * 3
    assert ids[2, -1] == tokenizer.sep_token_id and ids[1, 3:].tolist() == [tokenizer.pad_token_id] * 3
    assert QFormerTextCollate(tokenizer, 32)(["a red circle", "a"])["input_ids"].shape == (2, 5)


def test_transforms_normalise_with_clip_statistics():
    image = Image.new("RGB", (40, 24), (255, 0, 128))
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    for transform in (eval_transform(16), train_transform(16)):
        out = transform(image)
        assert out.shape == (3, 16, 16) and out.dtype == torch.float32
        assert torch.allclose(out.mean((1, 2)), expected, atol=1e-5)  # a flat image stays flat
    torch.manual_seed(0)
    half = Image.fromarray(np.concatenate([np.zeros((32, 16, 3), np.uint8), np.full((32, 16, 3), 255, np.uint8)], 1))
    flips = {bool(train_transform(32)(half)[0, 16, 0] > 0) for _ in range(20)}
    assert flips == {True, False}  # horizontal flips happen


# ------------------------------------------------------------------------------------- synthetic
def test_synthetic_shards_have_right_counts_and_captions_match_images(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["train"] == {"samples": 60, "shards": 3} and manifest["val"] == {"samples": 25, "shards": 2}
    urls = expand_urls(str(shards / "train")) + expand_urls(str(shards / "val"))
    ids, captions = [], []
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        meta, caption = json.loads(sample["json"]), sample["txt"].decode()
        image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        colors, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
        assert image.shape == (32, 32, 3)
        assert tuple(colors[counts.argmax()]) == COLORS[meta["background"]]  # most pixels: background
        assert tuple(image[0, 0]) == COLORS[meta["background"]] or tuple(image[-1, -1]) == COLORS[meta["background"]]
        assert any(tuple(c) == COLORS[meta["color"]] for c in colors)  # the shape's colour is drawn
        assert caption == (f"a {meta['size']} {meta['color']} {meta['shape']} at the {meta['position']} "
                           f"on a {meta['background']} background") == meta["caption"]
        assert "left" not in caption and "right" not in caption  # training flips horizontally
        assert sample["__key__"] == f"{meta['image_id']:09d}"
        ids.append(meta["image_id"])
        captions.append(caption)
    assert ids == list(range(85))
    assert len(set(captions[60:])) >= 23  # val captions nearly all distinct


def test_synthetic_writer_is_deterministic_cached_and_refuses_foreign_dirs(tmp_path):
    a = write_synthetic_shards(tmp_path / "a", 6, 2, 16, 4, seed=1)
    write_synthetic_shards(tmp_path / "b", 6, 2, 16, 4, seed=1)
    write_synthetic_shards(tmp_path / "c", 6, 2, 16, 4, seed=2)
    tar = "train/00001.tar"
    assert (tmp_path / "a" / tar).read_bytes() == (tmp_path / "b" / tar).read_bytes()
    assert (tmp_path / "a" / tar).read_bytes() != (tmp_path / "c" / tar).read_bytes()
    assert write_synthetic_shards(tmp_path / "a", 6, 2, 16, 4, seed=1) == a  # same set: kept as it is
    with pytest.raises(FileExistsError, match="is not a synthetic set"):
        write_synthetic_shards(tmp_path / "a", 7, 2, 16, 4, seed=1)
    cfg = OmegaConf.structured(DataConfig(name="synthetic")).synthetic
    cfg.cache_dir, cfg.num_train, cfg.num_val, cfg.image_size, cfg.samples_per_shard = str(tmp_path), 5, 3, 16, 2
    train, val = ensure_synthetic_shards(cfg)
    assert synthetic_dir(cfg).name == "n5-3-s16-k2-seed0-v1" and train == str(synthetic_dir(cfg) / "train")
    assert len(expand_urls(train)) == 3 and len(expand_urls(val)) == 2
    stamp = (synthetic_dir(cfg) / "manifest.json").stat().st_mtime_ns
    assert ensure_synthetic_shards(cfg) == (train, val)
    assert (synthetic_dir(cfg) / "manifest.json").stat().st_mtime_ns == stamp  # generated once
    assert not list(tmp_path.glob("*.tmp-*"))  # no temporary dirs left behind


def test_synthetic_datamodule_generates_shards_unless_given(tmp_path, tokenizer, shards):
    dm = datamodule(tokenizer, None, None, name="synthetic")
    dm.cfg.synthetic.cache_dir, dm.cfg.synthetic.num_train, dm.cfg.synthetic.num_val = str(tmp_path), 16, 4
    dm.cfg.synthetic.image_size = 32
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_urls == [str(synthetic_dir(dm.cfg.synthetic) / "train" / "00000.tar")]
    assert [k for b in dm.val_dataloader() for k in b["key"]] == [f"{16 + i:09d}" for i in range(4)]
    dm.cfg.val_shards = str(shards / "val")  # an explicit data.val_shards wins
    dm.setup("validate")
    assert len(dm.val_urls) == 2 and sum(len(b["key"]) for b in dm.val_dataloader()) == 25


# --------------------------------------------------------------------------------------- loaders
def test_train_loader_yields_contract_batches_with_epoch_length(shards, tokenizer):
    dm = datamodule(tokenizer, str(shards / "train"), str(shards / "val"))
    loader = dm.train_dataloader()
    first, second = list(loader), list(loader)
    assert len(first) == len(second) == 40 // 8 == dm.batches_per_epoch()
    b = first[0]
    assert set(b) == {"image", "input_ids", "attention_mask", "image_id", "key", "caption", "num_skipped"}
    assert b["image"].shape == (8, 3, 32, 32) and b["image"].dtype == torch.float32
    assert b["input_ids"].shape[0] == 8 and b["input_ids"].dtype == b["attention_mask"].dtype == torch.long
    assert b["attention_mask"].shape == b["input_ids"].shape and b["input_ids"][0, 0] == tokenizer.cls_token_id
    assert b["image_id"].dtype == torch.long and b["image_id"].shape == (8,) and b["image_id"].max() < 60
    assert len(b["key"]) == len(b["caption"]) == 8 and b["num_skipped"].dtype == torch.long
    assert b["num_skipped"].shape == () and int(b["num_skipped"]) == 0
    assert [int(k) for k in b["key"]] == b["image_id"].tolist()
    assert [k for x in first for k in x["key"]] != [k for x in second for k in x["key"]]  # a new order per epoch
    assert datamodule(tokenizer, str(shards / "train"), None).train_dataloader().__iter__().__next__()["key"] == \
        b["key"]  # seeded: the same first batch in a new run


def test_train_loader_with_two_workers_keeps_the_epoch_length(shards, tokenizer):
    dm = datamodule(tokenizer, str(shards / "train"), None, num_workers=2, samples_per_epoch=48)
    loader = dm.train_dataloader()
    for _ in range(2):  # persistent workers across epochs
        batches = list(loader)
        assert len(batches) == 6 and all(b["image"].shape == (8, 3, 32, 32) for b in batches)


def test_world_size_divides_the_epoch(shards, tokenizer):
    dm = datamodule(tokenizer, str(shards / "train"), None, samples_per_epoch=100)
    assert [dm.batches_per_epoch(w) for w in (1, 2, 4, 32)] == [12, 6, 3, 1]


def test_shards_without_resampling_split_by_rank_and_worker_and_cycle(shards, tokenizer):
    urls = [f"s{i}.tar" for i in range(5)]
    for rank, expected in ((0, {"s0.tar", "s2.tar", "s4.tar"}), (1, {"s1.tar", "s3.tar"})):
        stream = CycledShards(urls, seed=0, rank=rank, world=2)()
        drawn = [next(stream)["url"] for _ in range(3 * len(expected))]
        for p in range(3):  # each pass: every own shard exactly once
            assert set(drawn[p * len(expected):(p + 1) * len(expected)]) == expected
    dm = datamodule(tokenizer, str(shards / "train"), None, resampled=False, samples_per_epoch=160)
    batches = list(dm.train_dataloader())  # 160 samples from 60: the shards cycle
    assert len(batches) == 20 and len({k for b in batches for k in b["key"]}) == 60
    few = datamodule(tokenizer, str(shards / "val"), None, resampled=False, num_workers=3)
    with pytest.raises(ValueError, match="2 training shards cannot feed 1 ranks x 3 workers without resampling"):
        few.train_dataloader()


@pytest.mark.parametrize("workers", [0, 1])
def test_val_loader_reads_every_sample_once_in_order(shards, tokenizer, workers):
    dm = datamodule(tokenizer, None, str(shards / "val"), num_workers=workers)
    for _ in range(2):
        batches = list(dm.val_dataloader())
        assert [len(b["key"]) for b in batches] == [10, 10, 5]
        assert [k for b in batches for k in b["key"]] == [f"{60 + i:09d}" for i in range(25)]
        assert torch.cat([b["image_id"] for b in batches]).tolist() == list(range(60, 85))  # from the json
        assert sum(int(b["num_skipped"]) for b in batches) == 0


def test_brace_url_directory_and_joined_urls(shards, tokenizer):
    by_dir = expand_urls(str(shards / "train"))
    assert by_dir == expand_urls(str(shards / "train" / "{00000..00002}.tar"))
    assert [u.rsplit("/", 1)[-1] for u in by_dir] == ["00000.tar", "00001.tar", "00002.tar"]
    joined = expand_urls(f"{shards / 'train'}::{shards / 'val' / '{00000..00001}.tar'}")
    assert joined == by_dir + expand_urls(str(shards / "val"))
    dm = datamodule(tokenizer, None, f"{shards / 'val' / '00001.tar'}::{shards / 'val' / '00000.tar'}")
    keys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert keys[:5] == [f"{80 + i:09d}" for i in range(5)] and len(keys) == 25  # in the order given


def test_image_ids_are_stable_ints():
    assert stable_id("shards/00000.tar/000000001") == stable_id("shards/00000.tar/000000001") == 62210999745196863
    assert 0 <= stable_id("x") < 2**56
    assert sample_image_id(b'{"image_id": 42}', "u", "k") == 42
    assert sample_image_id(b'{"image_id": "17"}', "u", "k") == 17
    coco = sample_image_id(b'{"image_id": "COCO_1.jpg"}', "u", "k")
    assert coco == sample_image_id(b'{"image_id": "COCO_1.jpg"}', "v", "j") == stable_id("COCO_1.jpg")
    assert sample_image_id(None, "u", "k") == sample_image_id(b'{"caption": "x"}', "u", "k") == stable_id("u/k")
    assert sample_image_id(b"not json", "u", "k") == stable_id("u/k")
    assert sample_image_id(b'{"image_id": 99999999999999999999}', "u", "k") == stable_id("99999999999999999999")
    assert skipped_fraction(1, 9) == 0.1 and skipped_fraction(0, 0) == 0.0


# ----------------------------------------------------------------------------- bad data, bad layouts
def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(color=(255, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, tokenizer, caplog):
    members = []
    for i in range(12):
        members += [(f"{i:03d}.png", _png()), (f"{i:03d}.txt", b"a red square")]
    members[6:6] = [("100.png", b"not an image"), ("100.txt", b"broken image"),  # undecodable
                    ("101.png", _png())]  # no caption
    members += [("102.txt", b"no image"), ("103.jpg", _png()[:40]), ("103.txt", b"truncated"),
                ("104.png", _png()), ("104.txt", b"...")]  # empty once cleaned
    _write_tar(tmp_path / "00000.tar", members)
    dm = datamodule(tokenizer, str(tmp_path / "00000.tar"), str(tmp_path / "00000.tar"), samples_per_epoch=40)
    with caplog.at_level(logging.WARNING, logger="blip2_train.data"):
        batches = list(dm.val_dataloader())
    assert [len(b["key"]) for b in batches] == [10, 2]
    assert [int(b["num_skipped"]) for b in batches] == [2, 3]  # 100, 101 before batch 1; 102-104 after
    assert "100" not in [k for b in batches for k in b["key"]]
    for key, why in (("100", "undecodable image"), ("101", "no caption"), ("102", "no image"),
                     ("103", "undecodable image"), ("104", "empty caption")):
        assert any(f"sample {key} in shard {tmp_path / '00000.tar'}: {why}" in r.getMessage()
                   for r in caplog.records), key
    assert all(r.name == "blip2_train.data" for r in caplog.records)
    train = list(dm.train_dataloader())  # resampled: 5 bad in every 17 samples, counted in the batches
    seen, skipped = sum(len(b["key"]) for b in train), sum(int(b["num_skipped"]) for b in train)
    assert seen == 40 and 5 <= skipped <= 25 and skipped_fraction(skipped, seen) == skipped / (40 + skipped)


def test_truncated_shard_is_logged_and_counted_not_fatal(tmp_path, tokenizer, caplog, shards):
    src = shards / "val" / "00000.tar"
    with tarfile.open(src) as tar:
        member = tar.getmembers()[30]  # 11th sample's png: cut in the middle of its data
    data = src.read_bytes()[: member.offset_data + member.size // 2]
    (tmp_path / "00000.tar").write_bytes(data)
    dm = datamodule(tokenizer, None, f"{tmp_path / '00000.tar'}::{shards / 'val' / '00001.tar'}")
    with caplog.at_level(logging.WARNING, logger="blip2_train.data"):
        batches = list(dm.val_dataloader())
    assert sum(len(b["key"]) for b in batches) == 10 + 5  # 10 before the cut, then the next shard
    assert sum(int(b["num_skipped"]) for b in batches) == 1
    assert f"skipped the rest of shard {tmp_path / '00000.tar'}: unreadable tar data (ReadError" in caplog.text


def test_missing_shards_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"4 of 4 shards of .* do not exist \(first: .*00000.tar\)"):
        expand_urls(str(tmp_path / "{00000..00003}.tar"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"holds no .tar files \(found: \['notes.txt'\]\)"):
        expand_urls(str(tmp_path))
    _write_tar(tmp_path / "00000.tar", [("0.png", _png()), ("0.txt", b"a")])
    with pytest.raises(FileNotFoundError, match=r"1 of 2 shards .* \(first: .*00001.tar\)"):
        expand_urls(str(tmp_path / "{00000..00001}.tar"))


def test_wrongly_named_members_are_a_clear_error_not_an_empty_loop(tmp_path, tokenizer):
    members = []
    for i in range(5):
        members += [(f"{i:03d}.image", _png()), (f"{i:03d}.caption", b"a caption")]
    _write_tar(tmp_path / "00000.tar", members)
    dm = datamodule(tokenizer, str(tmp_path / "00000.tar"), str(tmp_path / "00000.tar"))
    with pytest.raises(DataLayoutError, match=r"members \{'caption': 5, 'image': 5\}.*img2dataset layout"):
        list(dm.val_dataloader())
    with pytest.raises(DataLayoutError, match=r"first 20 of shard .*00000.tar \(samples hold members "
                                              r"\{'caption': 20, 'image': 20\}"):
        next(iter(dm.train_dataloader()))  # resampled: an endless stream, stopped after 20 bad samples


def test_empty_shards_are_a_clear_error(tmp_path, tokenizer):
    _write_tar(tmp_path / "00000.tar", [])
    dm = datamodule(tokenizer, str(tmp_path), str(tmp_path))
    with pytest.raises(DataLayoutError, match="validation shards hold no samples"):
        list(dm.val_dataloader())
    with pytest.raises(DataLayoutError, match=r"100 shards in a row held no sample"):
        next(iter(dm.train_dataloader()))
    (tmp_path / "00000.tar").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(DataLayoutError, match=r"validation shards could not be read \(unreadable tar data"):
        list(dm.val_dataloader())
    dm.setup()
    (tmp_path / "00000.tar").unlink()  # gone after setup: resampling must not retry it forever
    with pytest.raises(DataLayoutError, match=r"20 shards in a row could not be read .*00000.tar"):
        next(iter(dm.train_dataloader()))


# ------------------------------------------------------------------------------------- mixed sources
def _id_shards(directory, first_id, count, per_shard=10):
    """Shards of ``count`` samples whose image_id start at ``first_id`` (which source a sample came from)."""
    directory.mkdir(parents=True)
    for shard in range(0, count, per_shard):
        members = []
        for i in range(shard, min(count, shard + per_shard)):
            key = f"{first_id + i:09d}"
            members += [(f"{key}.png", _png((i * 5 % 255, 0, 0))), (f"{key}.txt", b"a red square"),
                        (f"{key}.json", json.dumps({"image_id": first_id + i}).encode())]
        _write_tar(directory / f"{shard // per_shard:05d}.tar", members)
    return str(directory)


def mixed(tokenizer, tmp_path, weights=(1.0, 3.0), **kw):
    sources = [DataSourceConfig("coco", _id_shards(tmp_path / "coco", 0, 40), weights[0]),
               DataSourceConfig("cc3m", _id_shards(tmp_path / "cc3m", 1000, 30), weights[1])]
    return datamodule(tokenizer, None, None, sources=sources, **kw)


def test_sources_mix_by_weight_seeded_and_each_batch_names_its_sources(tmp_path, tokenizer):
    dm = mixed(tokenizer, tmp_path, samples_per_epoch=2400, shuffle_buffer=40)
    batches = list(dm.train_dataloader())
    assert len(batches) == 300 and set(batches[0]) >= {"source", "image_id", "num_skipped"}
    source = torch.cat([b["source"] for b in batches])  # [2400]
    image_id = torch.cat([b["image_id"] for b in batches])
    assert torch.equal(source == 1, image_id >= 1000)  # each sample from the source it names
    share = (source == 1).float().mean().item()
    sigma = (0.75 * 0.25 / 2400) ** 0.5  # binomial standard deviation of the share of weight 3 of 4
    assert abs(share - 0.75) < 4 * sigma, share
    assert set(image_id[source == 0].tolist()) == set(range(40))  # every sample of each source drawn
    assert set(image_id[source == 1].tolist()) == set(range(1000, 1030))
    again = torch.cat([b["source"] for b in mixed(tokenizer, tmp_path / "again", samples_per_epoch=400,
                                                      shuffle_buffer=40).train_dataloader()])
    assert torch.equal(again, source[:400])  # seeded: the same mix in a new run
    equal = torch.cat([b["source"] for b in mixed(tokenizer, tmp_path / "eq", (2.0, 2.0), samples_per_epoch=800,
                                                      shuffle_buffer=40).train_dataloader()])
    assert abs((equal == 1).float().mean().item() - 0.5) < 4 * (0.25 / 800) ** 0.5


def test_sources_without_resampling_need_enough_shards_per_source(tmp_path, tokenizer):
    dm = mixed(tokenizer, tmp_path, (1.0, 1.0), resampled=False, samples_per_epoch=400)
    batches = list(dm.train_dataloader())  # 4 and 3 shards, 1 worker: each source cycles its own
    image_id = torch.cat([b["image_id"] for b in batches])
    assert len(batches) == 50 and set(image_id.tolist()) == set(range(40)) | set(range(1000, 1030))
    few = mixed(tokenizer, tmp_path / "few", resampled=False, num_workers=4)
    with pytest.raises(ValueError, match="3 training shards of source cc3m cannot feed 1 ranks x 4 workers "
                                         "without resampling"):
        few.train_dataloader()


def test_source_config_errors_name_the_problem():
    from blip2_train.config import validate_sources

    def sources(*items):
        return [OmegaConf.create({"name": n, "shards": "/x", "weight": w}) for n, w in items]

    with pytest.raises(ValueError, match="not both"):
        validate_sources(sources(("a", 1)), "/data/cc3m")
    with pytest.raises(ValueError, match=r"name 'cc-3m' must be letters, digits and _"):
        validate_sources(sources(("cc-3m", 1)), None)
    with pytest.raises(ValueError, match="coco: weight must be > 0, got 0"):
        validate_sources(sources(("coco", 0)), None)
    with pytest.raises(ValueError, match=r"unique, got \['a', 'a'\]"):
        validate_sources(sources(("a", 1), ("a", 2)), None)


def test_fewer_shards_than_ranks_times_workers_work_resampled_and_fail_clearly_without(shards, tokenizer):
    resampled = datamodule(tokenizer, str(shards / "val" / "00000.tar"), None, num_workers=2, samples_per_epoch=64)
    resampled._world = lambda: (4, 3)  # rank 3 of 4, 2 workers each: 8 streams from 1 shard
    batches = list(resampled.train_dataloader())
    assert len(batches) == 64 // (8 * 4) == 2 and all(b["image"].shape == (8, 3, 32, 32) for b in batches)
    assert {int(k) for b in batches for k in b["key"]} <= set(range(60, 80))  # all from the one shard
    cycled = datamodule(tokenizer, str(shards / "train"), None, resampled=False, num_workers=1)
    cycled._world = lambda: (4, 0)
    with pytest.raises(ValueError, match="3 training shards cannot feed 4 ranks x 1 workers without resampling: "
                                         "use data.resampled=true"):
        cycled.train_dataloader()  # raised when the loader is built: before the first step
