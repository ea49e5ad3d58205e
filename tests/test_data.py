"""Data path: caption cleaning, tokenizer, synthetic shards, loaders, bad samples, bad layouts."""

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

from blip2_train.config import DataConfig
from blip2_train.data import Blip2DataModule, expand_urls
from blip2_train.data.synthetic import COLORS, write_synthetic_shards
from blip2_train.data.text import QFormerTextCollate, clean_caption
from blip2_train.tokenization import build_qformer_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_qformer_tokenizer(None, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "set"
    write_synthetic_shards(root, num_train=60, num_val=25, image_size=32, samples_per_shard=20, seed=3)
    return root


def datamodule(tokenizer, train, val, **kw):
    cfg = OmegaConf.structured(DataConfig(name="webdataset", train_shards=train, val_shards=val, batch_size=8,
                                          eval_batch_size=10, num_workers=0, shuffle_buffer=20,
                                          samples_per_epoch=40, **kw))
    collate = QFormerTextCollate(tokenizer, 32)
    return Blip2DataModule(cfg, image_size=32, train_text_collate=collate, eval_text_collate=collate, seed=0)


def test_clean_caption_like_lavis():
    assert clean_caption("A Dog!  Running (fast)... on the BEACH\n") == "a dog running fast on the beach"
    assert clean_caption(" ".join(["w"] * 60), max_words=50) == " ".join(["w"] * 50)


def test_tiny_tokenizer_has_dec_and_reloads_identically(tmp_path, tokenizer):
    again = build_qformer_tokenizer(None, tmp_path)
    assert "[DEC]" in tokenizer.get_vocab() and tokenizer.pad_token_id == 0
    text = "a large red circle at the top on a green background"
    ids = tokenizer(text)["input_ids"]
    assert ids == again(text)["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_synthetic_captions_describe_their_images(shards):
    urls = expand_urls(str(shards / "train"))
    assert len(urls) == 3
    count = 0
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        meta = json.loads(sample["json"])
        image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        colors, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
        assert tuple(colors[counts.argmax()]) == COLORS[meta["background"]]  # most pixels: background
        assert any(tuple(c) == COLORS[meta["color"]] for c in colors)  # the shape's colour is drawn
        assert meta["background"] in sample["txt"].decode() and meta["shape"] in sample["txt"].decode()
        count += 1
    assert count == 60
    assert json.loads((shards / "manifest.json").read_text())["val"]["samples"] == 25


def test_train_loader_batches_and_epoch_length(shards, tokenizer):
    dm = datamodule(tokenizer, str(shards / "train"), str(shards / "val"))
    batches = list(dm.train_dataloader())
    assert len(batches) == 40 // 8
    b = batches[0]
    assert b["image"].shape == (8, 3, 32, 32) and b["image"].dtype == torch.float32
    assert b["input_ids"].shape[0] == 8 and b["input_ids"].dtype == torch.long
    assert b["attention_mask"].shape == b["input_ids"].shape and b["image_id"].dtype == torch.long
    assert len(b["key"]) == 8 and len(b["caption"]) == 8 and int(b["num_skipped"]) == 0


def test_val_loader_reads_every_sample_once_in_order(shards, tokenizer):
    dm = datamodule(tokenizer, None, str(shards / "val"))
    keys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert keys == sorted(keys) and len(keys) == len(set(keys)) == 25
    ids = torch.cat([b["image_id"] for b in dm.val_dataloader()])
    assert ids.tolist() == [60 + i for i in range(25)]  # image_id from the json


def test_brace_url_and_directory_give_the_same_shards(shards):
    by_dir = expand_urls(str(shards / "train"))
    by_brace = expand_urls(str(shards / "train" / "{00000..00002}.tar"))
    assert by_dir == by_brace


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
    good = [(f"{i:03d}.png", _png()) for i in range(5)] + [(f"{i:03d}.txt", b"a red square") for i in range(5)]
    members = sorted(good, key=lambda m: m[0])
    members += [("100.png", b"not an image"), ("100.txt", b"broken image"),  # undecodable
                ("101.png", _png())]  # no caption
    _write_tar(tmp_path / "00000.tar", members)
    dm = datamodule(tokenizer, None, str(tmp_path / "00000.tar"))
    with caplog.at_level(logging.WARNING, logger="blip2_train.data"):
        batches = list(dm.val_dataloader())
    assert sum(len(b["key"]) for b in batches) == 5
    assert sum(int(b["num_skipped"]) for b in batches) == 2
    text = caplog.text
    assert "100" in text and "101" in text and "00000.tar" in text and "undecodable" in text


def test_truncated_shard_is_skipped_not_fatal(tmp_path, tokenizer, caplog, shards):
    data = (shards / "val" / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(data[: len(data) // 2])
    dm = datamodule(tokenizer, None, str(tmp_path / "00000.tar"))
    with caplog.at_level(logging.WARNING, logger="blip2_train.data"):
        batches = list(dm.val_dataloader())
    got = sum(len(b["key"]) for b in batches)
    assert 0 < got < 20
    assert "ReadError" in caplog.text and "00000.tar" in caplog.text


def test_missing_shard_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_urls(str(tmp_path / "{00000..00003}.tar"))
    with pytest.raises(FileNotFoundError, match="no .tar files"):
        expand_urls(str(tmp_path))


def test_wrong_member_names_are_a_clear_error(tmp_path, tokenizer):
    members = []
    for i in range(60):
        members += [(f"{i:03d}.image", _png()), (f"{i:03d}.caption", b"a caption")]
    _write_tar(tmp_path / "00000.tar", members)
    dm = datamodule(tokenizer, None, str(tmp_path / "00000.tar"))
    with pytest.raises(ValueError, match=r"\['caption', 'image'\].*img2dataset"):
        list(dm.val_dataloader())


def test_too_few_shards_without_resampling_is_a_clear_error(shards, tokenizer):
    dm = datamodule(tokenizer, str(shards / "val"), None, resampled=False)
    dm.cfg.num_workers = 3  # 2 val shards cannot feed 3 workers
    with pytest.raises(ValueError, match="without resampling"):
        dm.train_dataloader()
