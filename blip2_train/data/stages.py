"""The stages of the data pipeline: shard sources, bad-sample accounting, decode, shuffle, batch.

Each stage is a picklable object whose state (epoch counters, skip counts) lives in the loader
worker that runs it, so counts are per worker. The training loader sets each stage's epoch (and
a resumed run's skip) before every epoch's stream (``webdataset.EpochLoader``); its workers start
per epoch with those values, so each epoch's order, crops and mixing follow from (seed, rank,
worker, epoch) alone.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Callable, Iterator

import torch
from braceexpand import braceexpand
from PIL import Image

from blip2_train.data.text import clean_caption

log = logging.getLogger("blip2_train.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = "txt"
LAYOUT_CHECK = 20  # bad samples before a stream's first good one that mean a layout error
MAX_BAD_IN_A_ROW = 1000  # a stream that stops yielding good samples is broken, not unlucky
MAX_EMPTY_SHARDS = 100  # shards in a row without a single sample (empty tars under resampling)


def sample_caption(sample: dict, max_words: int, counter, url: str, key: str) -> str | None:
    """The sample's cleaned caption, counting the sample as good; None (skipped, counted) when empty."""
    caption = clean_caption(sample[TEXT_EXT].decode("utf-8", errors="replace"), max_words)
    if not caption:
        counter.skip("empty caption", url, key)
        return None
    counter.good_sample()
    return caption


class DataLayoutError(ValueError):
    """Shards whose contents cannot be the img2dataset layout (or cannot be read at all)."""


def stable_id(text: str) -> int:
    """A deterministic non-negative int64 (56 bits) from a string: the same in every process."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def sample_image_id(meta: bytes | None, url: str, key: str) -> int:
    """``image_id`` from the sample's json when it is an int64 (or a string of one); else a hash.

    A non-numeric id (``"COCO_123.jpg"``) is hashed, so captions of one image still share an id.
    Without an id the hash covers shard URL and key: keys repeat across datasets joined by ``::``.
    """
    value = None
    if meta:
        try:
            value = json.loads(meta).get("image_id")
        except (ValueError, AttributeError):
            value = None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63:
        return value
    return stable_id(f"{url}/{key}" if value is None else str(value))


class SkipCounter:
    """Bad samples of one copy of a pipeline (one worker): counted, logged, handed to batches.

    Also the guard against endless empty loops: a stream whose first samples are all bad, or that
    stops producing anything, raises instead of spinning.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """A new stream (an epoch or a validation pass) starts clean."""
        self.since_batch = 0  # handed to the next batch as num_skipped
        self.in_a_row = self.good = 0  # bad samples since the last good one; good ones in this stream
        self.empty_shards = self.broken_shards = 0  # shards in a row without a sample / unreadable
        self.shard: str | None = None  # the shard being read (stages run in one thread, in order)
        self.shard_failed = False
        self.found: dict[str, int] = {}  # member names of bad samples before the first good one
        self.last_reason = ""

    def skip(self, reason: str, url, key=None, members: list[str] | None = None) -> None:
        self.since_batch += 1
        self.in_a_row += 1
        self.last_reason = reason
        log.warning("skipped sample %s in shard %s: %s", key or "-", url, reason)
        self.check(url, key, members)

    def check(self, url, key=None, members: list[str] | None = None) -> None:
        if self.broken_shards >= LAYOUT_CHECK:
            raise DataLayoutError(f"{self.broken_shards} shards in a row could not be read (last: {url}: "
                                  f"{self.last_reason})")
        if self.good == 0:
            for member in members or ():
                self.found[member] = self.found.get(member, 0) + 1
            if self.in_a_row >= LAYOUT_CHECK:
                raise self.layout_error(url, key)
        if self.in_a_row >= MAX_BAD_IN_A_ROW:
            raise DataLayoutError(f"{self.in_a_row} bad samples in a row (last: shard {url}, key {key}: "
                                  f"{self.last_reason}); each is logged by logger blip2_train.data")

    def layout_error(self, url, key=None) -> DataLayoutError:
        what = f"samples hold members {self.found}" if self.found else "no sample could be read"
        return DataLayoutError(
            f"no usable sample in the first {self.in_a_row} of shard {url} ({what}; e.g. key {key}; last "
            f"problem: {self.last_reason}). Expected per key an image ({'|'.join(IMAGE_EXTS)}) and a "
            f"caption ({TEXT_EXT}), adjacent in the tar: the img2dataset layout.")

    def good_sample(self) -> None:
        self.good += 1
        self.in_a_row = 0

    def take(self) -> int:
        count, self.since_batch = self.since_batch, 0
        return count

    # ---- pipeline stages around webdataset's tar reader
    def watch_shards(self, shards: Iterator[dict]) -> Iterator[dict]:
        """First stage after the shard list: a new stream; empty shards counted."""
        self.reset()
        for shard in shards:
            self.shard, self.shard_failed = shard.get("url"), False
            self.empty_shards += 1
            if self.empty_shards > MAX_EMPTY_SHARDS:
                raise DataLayoutError(f"{MAX_EMPTY_SHARDS} shards in a row held no sample (last: "
                                      f"{shard.get('url')}): are they empty tar files?")
            yield shard

    def watch_samples(self, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            self.empty_shards = self.broken_shards = 0
            yield sample

    def tar_error(self, exn: Exception) -> bool:
        """webdataset's handler: unreadable shard or tar member (truncated, missing): skip the rest.

        One broken shard counts once, though webdataset reports a truncation at two levels.
        """
        if not self.shard_failed:
            self.shard_failed = True
            self.broken_shards += 1
            self.since_batch += 1
            message = str(exn.args[0] if exn.args else exn).split(" @ ")[0]
            self.last_reason = f"unreadable tar data ({exn.__class__.__name__}: {message})"
            log.warning("skipped the rest of shard %s: %s", self.shard, self.last_reason)
            self.check(self.shard)
        return True


class DecodeSamples:
    """Raw tar samples -> ``{image [3,H,W], caption, image_id, key}``; bad ones skipped and counted.

    Random augmentations draw from a torch generator state of their own, seeded per (seed, rank,
    worker, epoch), never from the process's global one: the crops of an epoch do not depend on
    the dropout or ITM draws of the training step around them, so a resumed run draws the same
    crops as an uninterrupted one (and decoding in the main process leaves the training draws alone).
    """

    def __init__(self, transform: Callable, max_words: int, counter: SkipCounter, finite: bool,
                 seed: int | str = 0, rank: int = 0):
        self.transform, self.max_words, self.counter, self.finite = transform, max_words, counter, finite
        self.seed, self.rank = seed, rank
        self.epoch = 0  # lives in the (persistent) worker: each epoch draws new crops

    def _rng_state(self) -> torch.Tensor:
        info = torch.utils.data.get_worker_info()
        name = f"augment-{self.seed}-{self.rank}-{info.id if info else 0}-{self.epoch}"
        self.epoch += 1
        return torch.Generator().manual_seed(stable_id(name)).get_state()

    def _transform(self, image, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outer = torch.get_rng_state()
        torch.set_rng_state(state)
        try:
            return self.transform(image), torch.get_rng_state()
        finally:
            torch.set_rng_state(outer)

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        counter = self.counter
        state = self._rng_state()
        for sample in samples:
            key, url = sample.get("__key__"), sample.get("__url__")
            image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if image_ext is None or TEXT_EXT not in sample:
                members = sorted(k for k in sample if not k.startswith("__"))
                missing = "image" if image_ext is None else "caption"
                counter.skip(f"no {missing} (members: {members})", url, key, members)
                continue
            try:
                with Image.open(io.BytesIO(sample[image_ext])) as image:
                    pixels, state = self._transform(image.convert("RGB"), state)  # [3, H, W]
            except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
                counter.skip(f"undecodable image ({err.__class__.__name__}: {err})", url, key)
                continue
            caption = sample_caption(sample, self.max_words, counter, url, key)
            if caption is None:
                continue
            yield {"image": pixels, "caption": caption, "image_id": sample_image_id(sample.get("json"), url, key),
                   "key": key}
        if self.finite and counter.good == 0:  # a validation pass that found nothing usable
            if counter.in_a_row:
                raise counter.layout_error("(all val shards)")
            raise DataLayoutError(f"the validation shards could not be read ({counter.last_reason})"
                                  if counter.last_reason else "the validation shards hold no samples")


class ShuffleBuffer:
    """webdataset's shuffle buffer, seeded per (seed, rank, worker, epoch) so runs repeat exactly."""

    def __init__(self, bufsize: int, seed: int, rank: int):
        self.bufsize, self.seed, self.rank = bufsize, seed, rank
        self.epoch = 0  # lives in the (persistent) worker: each epoch draws a new order

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        # epoch 0 keeps the name earlier versions used, so seeded runs (pinned test losses) still match
        name = f"{self.seed}-{self.rank}-{info.id if info else 0}" + (f"-{self.epoch}" if self.epoch else "")
        self.epoch += 1
        rng = random.Random(name)
        samples, buffer, initial = iter(samples), [], min(100, self.bufsize)

        def pick():
            k = rng.randint(0, len(buffer) - 1)
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            return buffer.pop()

        for sample in samples:
            buffer.append(sample)
            if len(buffer) < self.bufsize:  # read two per step until full, as webdataset does
                extra = next(samples, None)
                if extra is not None:
                    buffer.append(extra)
            if len(buffer) >= initial:
                yield pick()
        while buffer:
            yield pick()


class CycledShards:
    """Shards without resampling: this rank's and worker's own slice, in a new order each pass, forever.

    Endless so that ``with_epoch`` (not the shard count) decides the epoch length on every rank.
    """

    def __init__(self, urls: list[str], seed: int, rank: int, world: int):
        self.urls, self.seed, self.rank, self.world = urls, seed, rank, world
        self.epoch = 0

    def __call__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.urls[self.rank * workers + worker:: self.world * workers]
        if not mine:
            raise ValueError(f"rank {self.rank} worker {worker} has no shard of {len(self.urls)}")
        epoch, self.epoch = self.epoch, self.epoch + 1
        for n in range(2**62):
            order = list(mine)
            random.Random(f"{self.seed}-{self.rank}-{worker}-{epoch}-{n}").shuffle(order)
            yield from ({"url": url} for url in order)


class MixSources:
    """Samples drawn from several endless training streams, each with probability weight / sum.

    The draws are seeded per (seed, rank, worker, epoch), so a run repeats exactly; each sample
    carries ``source`` (its index), which batches turn into the per-source sample counts.
    """

    def __init__(self, names: list[str], streams: list, weights: list[float], seed: int, rank: int):
        if not (len(names) == len(streams) == len(weights)) or not names:
            raise ValueError(f"{len(names)} names, {len(streams)} streams, {len(weights)} weights: need one each")
        self.names, self.streams, self.weights = names, streams, [float(w) for w in weights]
        self.seed, self.rank = seed, rank
        self.epoch = 0

    def __call__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        rng = random.Random(f"mix-{self.seed}-{self.rank}-{info.id if info else 0}-{self.epoch}")
        self.epoch += 1
        streams, index = [iter(s) for s in self.streams], range(len(self.streams))
        while True:
            for source in rng.choices(index, weights=self.weights, k=1024):
                sample = next(streams[source], None)
                if sample is None:  # training streams are endless: an end means nothing was readable
                    raise DataLayoutError(f"training source {self.names[source]} stopped yielding samples")
                sample["source"] = source
                yield sample


class CounterGroup:
    """The skip counters of several sources, read as one by the batcher."""

    def __init__(self, counters: list[SkipCounter]):
        self.counters = counters

    def take(self) -> int:
        return sum(c.take() for c in self.counters)


class BatchSamples:
    """Samples -> batches: image [B,3,H,W] (or vision_tokens [B,N,W] from the feature cache), text
    fields, image_id [B], key, caption, num_skipped [], and source [B] when sources are mixed."""

    def __init__(self, batch_size: int, text_collate: Callable, counter: SkipCounter | CounterGroup,
                 partial: bool, rank: int = 0):
        self.batch_size, self.text_collate, self.counter, self.partial = batch_size, text_collate, counter, partial
        self.rank = rank
        self.epoch = 0
        # resume: the first stream leaves out the batches of the epoch a run had already trained on
        # (this many over all workers; set before the workers start, used once)
        self.skip_batches = 0

    def collate(self, samples: list[dict]) -> dict:
        captions = [s["caption"] for s in samples]
        batch = {
            "image_id": torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
            "key": [s["key"] for s in samples],
            "caption": captions,
            "num_skipped": torch.tensor(self.counter.take(), dtype=torch.long),
        }
        if "vision_tokens" in samples[0]:  # data.feature_cache: the frozen encoder's output, no image
            batch["vision_tokens"] = torch.stack([s["vision_tokens"] for s in samples])  # [B, N, W]
        else:
            batch["image"] = torch.stack([s["image"] for s in samples])  # [B, 3, H, W]
        if "source" in samples[0]:  # mixed sources: which one each sample came from
            batch["source"] = torch.tensor([s["source"] for s in samples], dtype=torch.long)  # [B]
        if getattr(self.text_collate, "wants_samples", False):  # VQA: questions and answers (data/vqa.py)
            batch.update(self.text_collate(samples))
        else:
            batch.update(self.text_collate(captions))  # input_ids, attention_mask [B, T]
        return batch

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        start = getattr(self.text_collate, "start_stream", None)  # seeded per stream (PrefixLMCollate)
        if start is not None:
            start(self.rank, worker, self.epoch)
        self.epoch += 1
        # the loader takes batches from its workers in turn: batch j of an epoch is worker j % workers'
        skip, self.skip_batches = len(range(worker, self.skip_batches, workers)), 0
        chunk = []
        for sample in samples:
            chunk.append(sample)
            if len(chunk) == self.batch_size:
                if skip:  # decoded as before (the same augmentation draws), not collated or handed on
                    skip -= 1
                    self.counter.take()
                else:
                    yield self.collate(chunk)
                chunk = []
        if chunk and self.partial:
            yield self.collate(chunk)


def expand_urls(spec: str) -> list[str]:
    """Shard URLs from brace patterns and/or directories (every .tar, sorted), joined by ``::``."""
    urls: list[str] = []
    for part in str(spec).split("::"):
        part = os.path.expanduser(part.strip())
        if not part:
            continue
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                raise FileNotFoundError(f"shard directory {part} holds no .tar files (found: "
                                        f"{sorted(os.listdir(part))[:10]})")
            urls.extend(found)
            continue
        expanded = list(braceexpand(part))
        local = [u for u in expanded if "://" not in u and not u.startswith("pipe:")]
        missing = [u for u in local if not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(expanded)} shards of {part!r} do not exist (first: {missing[0]}); "
                f"give a directory of .tar files or a brace pattern such as dir/{{00000..00007}}.tar")
        urls.extend(expanded)
    if not urls:
        raise FileNotFoundError(f"no shards in {spec!r}")
    return urls
