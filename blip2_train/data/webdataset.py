"""webdataset pipeline for image-caption shards in the img2dataset layout.

A sample is ``{key}.jpg|jpeg|png|webp`` + ``{key}.txt`` (+ ``{key}.json`` with ``image_id``).
Training resamples shards (every rank and worker draws its own stream) and ``with_epoch`` gives
every rank the same number of batches, so DDP never waits on a rank that ran out. Validation
reads the val shards once, in order, without resampling; every rank reads all of them.

A bad sample (undecodable image, missing caption, broken tar) is skipped, counted and logged
with its shard and key; the count reaches the trainer in each batch as ``num_skipped``.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import random
from typing import Callable

import lightning as L
import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from blip2_train.data.text import clean_caption
from blip2_train.data.transforms import eval_transform, train_transform

log = logging.getLogger("blip2_train.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt",)
MAX_CONSECUTIVE_BAD = 50  # a stream of only bad samples is a layout error, not bad luck

_skipped_in_worker = 0  # per worker process; handed to the next batch and reset
_bad_in_a_row = 0


def expand_urls(spec: str) -> list[str]:
    """Shard URLs from brace patterns and/or directories, several joined by ``::``."""
    urls: list[str] = []
    for part in str(spec).split("::"):
        part = part.strip()
        if not part:
            continue
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                raise FileNotFoundError(f"shard directory {part} holds no .tar files")
            urls.extend(found)
            continue
        for url in braceexpand(part):
            if "://" not in url and not url.startswith("pipe:") and not os.path.exists(url):
                raise FileNotFoundError(f"shard {url} does not exist (from {spec!r}); give a directory of "
                                        f".tar files or a brace pattern such as dir/{{00000..00007}}.tar")
            urls.append(url)
    if not urls:
        raise FileNotFoundError(f"no shards in {spec!r}")
    return urls


def stable_id(text: str) -> int:
    """A deterministic non-negative int64 from a string (same in every process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def _skip(reason: str, url, key) -> None:
    global _skipped_in_worker, _bad_in_a_row
    _skipped_in_worker += 1
    _bad_in_a_row += 1
    log.warning("skipped sample %s in shard %s: %s", key, url, reason)


def _tar_error_handler(exn: Exception) -> bool:
    """Broken tar members / unreadable shards: log with the shard, count, continue."""
    _skip(f"{exn.__class__.__name__}: {exn.args[0] if exn.args else exn}", exn.args[-1] if exn.args else "?", "-")
    if _bad_in_a_row >= MAX_CONSECUTIVE_BAD:
        raise RuntimeError(f"{MAX_CONSECUTIVE_BAD} unreadable samples in a row; last error: {exn!r}") from exn
    return True


def _decode(transform, max_words: int) -> Callable:
    """Stage: raw tar samples -> {image, caption, image_id, key}; bad samples skipped and counted."""

    def stage(samples):
        global _bad_in_a_row, _skipped_in_worker
        _bad_in_a_row = _skipped_in_worker = 0  # a new stream starts clean in this process
        for sample in samples:
            key, url = sample.get("__key__"), sample.get("__url__")
            image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
            text_ext = next((e for e in TEXT_EXTS if e in sample), None)
            if image_ext is None or text_ext is None:
                found = sorted(k for k in sample if not k.startswith("__"))
                if image_ext is None and text_ext is None and _bad_in_a_row + 1 >= MAX_CONSECUTIVE_BAD:
                    raise ValueError(
                        f"shard {url}: samples hold {found} (e.g. key {key}), but an image "
                        f"({'|'.join(IMAGE_EXTS)}) and a caption (txt) are expected per key: is this "
                        f"the img2dataset layout?")
                _skip(f"missing {'image' if image_ext is None else 'caption'} (members: {found})", url, key)
                continue
            try:
                image = Image.open(io.BytesIO(sample[image_ext])).convert("RGB")
                pixels = transform(image)
            except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
                _skip(f"undecodable image ({err.__class__.__name__}: {err})", url, key)
                continue
            caption = clean_caption(sample[text_ext].decode("utf-8", errors="replace"), max_words)
            if not caption:
                _skip("empty caption", url, key)
                continue
            image_id = None
            if "json" in sample:
                try:
                    image_id = json.loads(sample["json"]).get("image_id")
                except ValueError:
                    image_id = None
            if image_id is None or not str(image_id).lstrip("-").isdigit():
                image_id = stable_id(f"{url}/{key}" if image_id is None else str(image_id))
            _bad_in_a_row = 0
            yield {"image": pixels, "caption": caption, "image_id": int(image_id), "key": key}

    return stage


def _shuffle(bufsize: int, seed: int) -> Callable:
    """Stage: a shuffle buffer seeded per (seed, rank, worker), so runs repeat exactly."""

    def stage(samples):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
        rng = random.Random(f"{seed}-{rank}-{worker}")
        return wds.filters._shuffle(samples, bufsize=bufsize, initial=min(bufsize, 100), rng=rng)

    return stage


def make_collate(text_collate: Callable) -> Callable:
    def collate(samples: list[dict]) -> dict:
        global _skipped_in_worker
        captions = [s["caption"] for s in samples]
        batch = {
            "image": torch.stack([s["image"] for s in samples]),
            "image_id": torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
            "key": [s["key"] for s in samples],
            "caption": captions,
            "num_skipped": torch.tensor(_skipped_in_worker, dtype=torch.long),
        }
        _skipped_in_worker = 0
        batch.update(text_collate(captions))
        return batch

    return collate


def _batched(batch_size: int, collate: Callable, partial: bool) -> Callable:
    def stage(samples):
        chunk = []
        for sample in samples:
            chunk.append(sample)
            if len(chunk) == batch_size:
                yield collate(chunk)
                chunk = []
        if chunk and partial:
            yield collate(chunk)

    return stage


class Blip2DataModule(L.LightningDataModule):
    """Train and validation loaders over webdataset shards (or the generated synthetic set)."""

    def __init__(self, data_cfg, image_size: int, train_text_collate: Callable, eval_text_collate: Callable,
                 seed: int = 0):
        super().__init__()
        self.cfg = data_cfg
        self.image_size = image_size
        self.train_text_collate = train_text_collate
        self.eval_text_collate = eval_text_collate
        self.seed = seed
        self.train_urls: list[str] | None = None
        self.val_urls: list[str] | None = None

    def prepare_data(self) -> None:
        if self.cfg.name == "synthetic":
            from blip2_train.data.synthetic import ensure_synthetic_shards

            ensure_synthetic_shards(self.cfg.synthetic)

    def setup(self, stage: str | None = None) -> None:
        train, val = self.cfg.train_shards, self.cfg.val_shards
        if self.cfg.name == "synthetic":
            from blip2_train.data.synthetic import ensure_synthetic_shards

            gen_train, gen_val = ensure_synthetic_shards(self.cfg.synthetic)
            train, val = train or gen_train, val or gen_val
        self.train_urls = expand_urls(train) if train else None
        self.val_urls = expand_urls(val) if val else None

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        return 1, 0

    def train_dataloader(self):
        if self.train_urls is None:
            self.setup("fit")
        if not self.train_urls:
            raise ValueError("no training shards: set data.train_shards")
        cfg = self.cfg
        world, rank = self._world()
        workers = cfg.num_workers
        if cfg.resampled:
            shards = [wds.ResampledShards(self.train_urls, seed=self.seed + 1000 * rank, deterministic=True)]
        else:
            needed = world * max(1, workers)
            if len(self.train_urls) < needed:
                raise ValueError(
                    f"{len(self.train_urls)} training shards cannot feed {world} ranks x {max(1, workers)} "
                    f"workers without resampling: use data.resampled=true, fewer workers, or more shards")
            shards = [wds.SimpleShardList(self.train_urls), wds.split_by_node, wds.split_by_worker]
        pipeline = wds.DataPipeline(
            *shards,
            wds.tarfile_to_samples(handler=_tar_error_handler),
            _shuffle(cfg.shuffle_buffer, self.seed + 7919 * rank),
            _decode(train_transform(self.image_size) if cfg.train_augment else eval_transform(self.image_size),
                    cfg.max_words),
            _batched(cfg.batch_size, make_collate(self.train_text_collate), partial=False),
        )
        batches = max(1, cfg.samples_per_epoch // (cfg.batch_size * world))
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers,
                               persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
        return loader.with_epoch(batches)

    def val_dataloader(self):
        if self.val_urls is None:
            self.setup("validate")
        if not self.val_urls:
            return []
        cfg = self.cfg
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.val_urls),
            wds.tarfile_to_samples(handler=_tar_error_handler),
            _decode(eval_transform(self.image_size), cfg.max_words),
            _batched(cfg.eval_batch_size, make_collate(self.eval_text_collate), partial=True),
        )
        # one worker at most: samples arrive in shard order
        return wds.WebLoader(pipeline, batch_size=None, num_workers=min(1, cfg.num_workers))
