"""webdataset pipeline for image-caption shards in the img2dataset layout.

A sample is ``{key}.jpg|jpeg|png|webp`` + ``{key}.txt`` (+ ``{key}.json`` with ``image_id``).
Training streams never end: resampled shards (or, with ``data.resampled=false``, each rank's and
worker's own shards cycled in a fresh order), cut into epochs of the same number of batches on every
rank (``EpochLoader``) so that DDP never waits on a rank that ran out; a resumed run continues at the
batch its checkpoint was written after. Validation reads the val shards
once, in order, without resampling or node splitting: every rank sees the whole val set (retrieval
needs all pairs), in one worker so the order is stable.

``data.sources`` mixes several training sources by weight (``MixSources``, each with its own
shard stream, shuffle buffer and skip counter; batches carry ``source``). ``data.feature_cache``
swaps image decoding for a lookup of the frozen encoder's tokens (``feature_cache.py``).

A bad sample (undecodable image, missing caption or image, broken tar) is skipped, counted and
logged (logger ``blip2_train.data``) with its shard and key; each batch carries ``num_skipped``,
the count of its worker since its previous batch. Shards that yield nothing usable stop the run
with an error naming what was found instead of looping forever.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from itertools import islice

import lightning as L
import torch
import webdataset as wds

from blip2_train.data.stages import (
    BatchSamples,
    CounterGroup,
    CycledShards,
    DataLayoutError,
    DecodeSamples,
    MixSources,
    ShuffleBuffer,
    SkipCounter,
    expand_urls,
    sample_image_id,
    stable_id,
)
from blip2_train.data.transforms import eval_transform, train_transform

log = logging.getLogger("blip2_train.data")

__all__ = ["Blip2DataModule", "DataLayoutError", "expand_urls", "sample_image_id", "skipped_fraction", "stable_id"]


def ensure_synthetic(synthetic_cfg) -> tuple[str, str]:
    """The generated synthetic set's train and val dirs: captions (``kind: shapes | scenes``), or questions (``kind: qa``)."""
    kind = synthetic_cfg.get("kind", "shapes")
    if kind == "qa":
        from blip2_train.data.synthetic_qa import ensure_synthetic_qa_shards

        return ensure_synthetic_qa_shards(synthetic_cfg)
    from blip2_train.data.synthetic import ensure_synthetic_shards

    return ensure_synthetic_shards(synthetic_cfg)


def skipped_fraction(num_skipped: int, num_good: int) -> float:
    """Fraction of bad samples among all read; the trainer stops above ``data.max_skipped_fraction``."""
    total = num_skipped + num_good
    return num_skipped / total if total else 0.0


class Blip2DataModule(L.LightningDataModule):
    """Train and validation loaders over webdataset shards (or the generated synthetic set)."""

    def __init__(self, data_cfg, image_size: int, train_text_collate: Callable, eval_text_collate: Callable,
                 seed: int = 0, encoder_signature: dict | None = None, sample_decoder: Callable | None = None):
        """``sample_decoder``: the decode stage's class (default DecodeSamples: image + caption;
        data/vqa.py's DecodeVQASamples reads questions and answers)."""
        super().__init__()
        self.sample_decoder = sample_decoder or DecodeSamples
        self.cfg = data_cfg
        self.image_size = image_size
        self.train_text_collate = train_text_collate
        self.eval_text_collate = eval_text_collate
        self.seed = seed
        self.encoder_signature = encoder_signature  # checked against data.feature_cache files
        self.train_urls: list[str] | None = None
        self.source_urls: list[tuple[str, list[str], float]] = []
        self.val_urls: list[str] | None = None

    def prepare_data(self) -> None:
        """Lightning calls this on one process per node first: generate the synthetic set there."""
        if self.cfg.name == "synthetic":
            ensure_synthetic(self.cfg.synthetic)

    def setup(self, stage: str | None = None) -> None:
        train, val = self.cfg.train_shards, self.cfg.val_shards
        if self.cfg.name == "synthetic":  # explicit data.train_shards / val_shards win
            gen_train, gen_val = ensure_synthetic(self.cfg.synthetic)
            train, val = train or gen_train, val or gen_val
        sources = self.cfg.get("sources") or []
        # (name, shard URLs, weight) per training source; they replace train_shards
        self.source_urls = [(s.name, expand_urls(s.shards), float(s.weight)) for s in sources]
        self.train_urls = None if sources else (expand_urls(train) if train else None)
        self.val_urls = expand_urls(val) if val else None

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        return 1, 0

    def batches_per_epoch(self, world_size: int = 1) -> int:
        """Training batches per rank per epoch: ``samples_per_epoch // (batch_size * world_size)``."""
        return max(1, self.cfg.samples_per_epoch // (self.cfg.batch_size * world_size))

    def train_dataloader(self):
        if self.train_urls is None and not self.source_urls:
            self.setup("fit")
        cfg = self.cfg
        if not self.train_urls and not self.source_urls:
            raise ValueError("no training shards: set data.train_shards or data.sources")
        world, rank = self._world()
        transform = train_transform(self.image_size) if cfg.train_augment else eval_transform(self.image_size)
        if self.source_urls:  # several sources, mixed by weight
            counters = [SkipCounter() for _ in self.source_urls]
            buffer = max(100, cfg.shuffle_buffer // len(self.source_urls))  # the same memory as one source
            streams = [wds.DataPipeline(*self._sample_stages(urls, f"{self.seed}-{name}", rank, world, counter,
                                                             buffer, transform, f" of source {name}"))
                       for (name, urls, _), counter in zip(self.source_urls, counters)]
            names, weights = [s[0] for s in self.source_urls], [s[2] for s in self.source_urls]
            stages = [MixSources(names, streams, weights, self.seed, rank)]
            counter = CounterGroup(counters)
        else:
            counter = SkipCounter()
            stages = self._sample_stages(self.train_urls, self.seed, rank, world, counter, cfg.shuffle_buffer,
                                         transform, "")
        batcher = BatchSamples(cfg.batch_size, self.train_text_collate, counter, partial=False, rank=rank)
        pipeline = wds.DataPipeline(*stages, batcher)
        # batch_size=None: batches are collated in the workers, the main process only forwards them.
        # Workers are started per epoch (not persistent), so each gets the epoch and resume position the
        # main process set on the stages (EpochLoader); the loader's worker seeds come from its own
        # generator, not from the global RNG the training draws from.
        workers = cfg.num_workers
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=False,
                               pin_memory=torch.cuda.is_available(),
                               generator=torch.Generator().manual_seed(self.seed + 7919 * rank))
        return EpochLoader(loader, self.batches_per_epoch(world), pipeline, self._batches_trained)

    def _batches_trained(self) -> int | None:
        """Training batches the attached trainer has trained on over the whole run (restored from the
        checkpoint when resuming: ``processed`` counts the batch a checkpoint was written after); None
        without a trainer."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        return trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def _sample_stages(self, urls: list[str], seed, rank: int, world: int, counter: SkipCounter, buffer: int,
                       transform: Callable, of_source: str) -> list:
        """Shards -> decoded samples, endless: resampled, or this rank's and worker's own shards cycled."""
        workers = max(1, self.cfg.num_workers)
        if self.cfg.resampled:  # every rank and worker draws its own stream of shards
            if isinstance(seed, str):
                seed = stable_id(seed) % 2**31
            shards = wds.ResampledShards(urls, seed=seed + 1000 * rank, deterministic=True)
        else:
            if len(urls) < world * workers:
                raise ValueError(
                    f"{len(urls)} training shards{of_source} cannot feed {world} ranks x {workers} workers "
                    f"without resampling: use data.resampled=true, fewer workers, or more shards")
            shards = CycledShards(urls, seed, rank, world)
        if self.cfg.get("feature_cache") and self.sample_decoder is not DecodeSamples:
            raise ValueError("data.feature_cache serves caption samples only; unset it for VQA (stage.task=vqa)")
        if self.cfg.get("feature_cache"):  # the frozen encoder's tokens instead of images
            from blip2_train.data.feature_cache import LookupFeatures, missing_caches

            missing = missing_caches(self.cfg.feature_cache, urls)
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} of {len(urls)} training shards{of_source} have no features in "
                    f"data.feature_cache={self.cfg.feature_cache} (first: {missing[0]}); write them with "
                    f"python -m blip2_train.data.feature_cache <the run's overrides>")
            if self.cfg.train_augment:
                log.warning("data.feature_cache holds eval-transform tokens: training sees no augmentation "
                            "(set data.train_augment=false to say so)")
            decode = LookupFeatures(self.cfg.feature_cache, self.encoder_signature, self.cfg.max_words, counter)
        else:
            decode = self.sample_decoder(transform, self.cfg.max_words, counter, finite=False, seed=seed, rank=rank)
        return [
            shards,
            counter.watch_shards,
            wds.tarfile_to_samples(handler=counter.tar_error),
            counter.watch_samples,
            ShuffleBuffer(buffer, seed, rank),
            decode,
        ]

    def val_dataloader(self):
        if self.val_urls is None:
            self.setup("validate")
        if not self.val_urls:
            return []
        cfg = self.cfg
        counter = SkipCounter()
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.val_urls),
            counter.watch_shards,
            wds.tarfile_to_samples(handler=counter.tar_error),
            counter.watch_samples,
            self.sample_decoder(eval_transform(self.image_size), cfg.max_words, counter, finite=True),
            BatchSamples(cfg.eval_batch_size, self.eval_text_collate, counter, partial=True),
        )
        workers = min(1, cfg.num_workers)  # one worker at most: samples arrive in shard order
        return wds.WebLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                             pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(self.seed))


class EpochLoader:
    """The endless training loader cut into epochs of ``batches`` batches; each epoch restarts the
    stream, whose stages draw their order, crops and mixing per (seed, rank, worker, epoch).

    The stream is one fixed sequence of epochs whatever Lightning calls its epochs (a stop ends one
    early; a resumed fit asks for a new iterator twice before its first step): each ``iter()`` starts
    at the position ``trained()`` gives, the number of batches trained on so far. A run resumed from
    a checkpoint therefore continues where it was written: its first epoch is the interrupted one, less
    the batches already trained on, which the workers read and drop (the same decoding and augmentation
    draws as before), so the resumed run sees the batches an uninterrupted one would.
    """

    def __init__(self, loader, batches: int, pipeline, trained: Callable[[], int | None]):
        self.loader, self.batches, self.pipeline, self.trained = loader, batches, pipeline, trained
        self._iters = 0  # without a trainer: each iter() is the next epoch

    def _stages(self) -> list:
        """Every stage object with an epoch counter, sources' pipelines included."""
        found, todo = [], list(self.pipeline.pipeline)
        while todo:
            stage = todo.pop()
            target = getattr(stage, "__self__", stage)  # bound methods (SkipCounter.watch_shards)
            if isinstance(target, wds.DataPipeline):
                todo.extend(target.pipeline)
            elif isinstance(target, MixSources):
                todo.extend(target.streams)
            if hasattr(target, "epoch") and all(target is not f for f in found):
                found.append(target)
        return found

    def position(self) -> tuple[int, int]:
        """(epoch, batches of it already trained on) where the next ``iter()`` starts."""
        trained = self.trained()
        if trained is None:
            return self._iters, 0
        return divmod(trained, self.batches)

    def __iter__(self):
        epoch, done = self.position()
        self._iters += 1
        for stage in self._stages():
            # webdataset's ResampledShards counts from -1 and adds one before each stream
            stage.epoch = epoch - 1 if isinstance(stage, wds.ResampledShards) else epoch
            if isinstance(stage, BatchSamples):
                stage.skip_batches = done
        return islice(iter(self.loader), self.batches - done)
