"""Frozen-feature cache (``data.feature_cache=DIR``): the frozen encoder's tokens of every training
sample, computed once, so later epochs (and stage 2) skip the ViT.

    python -m blip2_train.data.feature_cache encoder=eva data.train_shards=/data/coco/train
        data.feature_cache=/data/coco_features [trainer.accelerator=gpu]

writes one ``DIR/<shard stem>-<hash of its path>.safetensors`` per training shard: ``tokens``
[N, T, W] in the encoder's precision (fp16 for EVA ViT-g on GPU: 257 x 1408 x 2 = 723,712 bytes a
sample at 224 px; CLIP ViT-L 526,336), the sample keys in its metadata and the encoder that made
them. Training with the same ``data.feature_cache`` reads captions from the shards and tokens from
the cache instead of decoding images. The images go through the eval transform (resize, no crop,
no flip), so a cached run equals an uncached one only with ``data.train_augment=false``.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch

from blip2_train.data.stages import (
    TEXT_EXT,
    DataLayoutError,
    SkipCounter,
    sample_caption,
    sample_image_id,
    stable_id,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cache_path(cache_dir: str, url: str) -> Path:
    """Where the features of shard ``url`` live: its stem plus a hash of its path (stems repeat across sets)."""
    return Path(cache_dir) / f"{Path(url).stem}-{stable_id(os.path.abspath(url)):014x}.safetensors"


def encoder_signature(encoder_cfg) -> dict[str, str]:
    """What makes two caches interchangeable: the encoder, its weights, input size, cut and precision."""
    return {name: str(encoder_cfg.get(name)) for name in
            ("model_name", "pretrained", "image_size", "drop_last_blocks", "precision")}


def missing_caches(cache_dir: str, urls: list[str]) -> list[str]:
    return [url for url in urls if not cache_path(cache_dir, url).exists()]


@torch.no_grad()
def write_feature_cache(encoder, encoder_cfg, urls: list[str], cache_dir: str, batch_size: int = 64,
                        max_words: int = 50, progress: bool = True) -> dict:
    """Encode every sample of every shard (eval transform) once; shards already cached are kept."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    signature = encoder_signature(encoder_cfg)
    dtype = DTYPES[encoder_cfg.precision]
    summary = {"shards": 0, "kept": 0, "samples": 0, "bytes_per_sample": 0}
    for url in tqdm(urls, desc="shards", disable=not progress):
        path = cache_path(cache_dir, url)
        if path.exists():
            summary["kept"] += 1
            continue
        keys, tokens = _encode_shard(encoder, url, encoder_cfg.image_size, max_words, batch_size, dtype)
        stacked = torch.cat(tokens)  # [N, T, W]
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        save_file({"tokens": stacked.contiguous()}, str(tmp),
                  metadata={"keys": json.dumps(keys), "shard": os.path.abspath(url), **signature})
        os.replace(tmp, path)  # a cache file is complete or absent
        summary["shards"] += 1
        summary["samples"] += len(keys)
        summary["bytes_per_sample"] = stacked[0].numel() * stacked.element_size()
    return summary


@torch.no_grad()
def _encode_shard(encoder, url: str, image_size: int, max_words: int, batch_size: int, dtype: torch.dtype
                  ) -> tuple[list[str], list[torch.Tensor]]:
    """The keys and encoder tokens ([b, T, W] chunks) of one shard's usable samples, in shard order."""
    import webdataset as wds

    from blip2_train.data.stages import DecodeSamples
    from blip2_train.data.transforms import eval_transform

    device = next(encoder.parameters()).device
    counter = SkipCounter()
    samples = DecodeSamples(eval_transform(image_size), max_words, counter, finite=True)(
        wds.tarfile_to_samples(handler=counter.tar_error)(iter([{"url": url}])))
    keys, tokens, chunk = [], [], []
    for sample in itertools.chain(samples, [None]):  # streamed; None flushes the last chunk
        if sample is not None:
            chunk.append(sample)
        if chunk and (sample is None or len(chunk) == batch_size):
            images = torch.stack([s["image"] for s in chunk]).to(device)  # [b, 3, H, W]
            tokens.append(encoder(images).to(dtype).cpu())  # [b, T, W]
            keys.extend(s["key"] for s in chunk)
            chunk = []
    return keys, tokens


class LookupFeatures:
    """Raw tar samples -> ``{vision_tokens [T, W], caption, image_id, key}`` from the cache (no decode).

    Stands where ``DecodeSamples`` stands; keeps the last few shards' cache files open (the shuffle
    buffer mixes shards).
    """

    def __init__(self, cache_dir: str, signature: dict | None, max_words: int, counter: SkipCounter,
                 open_files: int = 8):
        self.cache_dir, self.signature, self.max_words, self.counter = cache_dir, signature, max_words, counter
        self.open_files = open_files

    def _open(self, url: str, handles: OrderedDict):
        from safetensors import safe_open

        if url in handles:
            handles.move_to_end(url)
            return handles[url]
        path = cache_path(self.cache_dir, url)
        if not path.exists():
            raise DataLayoutError(f"shard {url} has no features in data.feature_cache={self.cache_dir} (expected "
                                  f"{path.name}); write them with python -m blip2_train.data.feature_cache")
        handle = safe_open(str(path), framework="pt")
        meta = handle.metadata()
        if self.signature is not None:
            differ = {k: (meta.get(k), v) for k, v in self.signature.items() if meta.get(k) != v}
            if differ:
                raise DataLayoutError(f"{path} was written by another encoder setting (cached, configured): "
                                      f"{differ}; write the cache again into a new directory")
        rows = {key: row for row, key in enumerate(json.loads(meta["keys"]))}
        handles[url] = (handle.get_slice("tokens"), rows)
        if len(handles) > self.open_files:
            handles.popitem(last=False)
        return handles[url]

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        counter, handles = self.counter, OrderedDict()
        for sample in samples:
            key, url = sample.get("__key__"), sample.get("__url__")
            if TEXT_EXT not in sample:
                members = sorted(k for k in sample if not k.startswith("__"))
                counter.skip(f"no caption (members: {members})", url, key, members)
                continue
            tokens, rows = self._open(url, handles)
            row = rows.get(key)
            if row is None:  # the writer skipped it (undecodable image): skip it here too
                counter.skip("not in the feature cache (its image could not be decoded when it was written)",
                             url, key)
                continue
            caption = sample_caption(sample, self.max_words, counter, url, key)
            if caption is None:
                continue
            yield {"vision_tokens": tokens[row:row + 1][0].float(), "caption": caption,
                   "image_id": sample_image_id(sample.get("json"), url, key), "key": key}


def main(argv: list[str] | None = None) -> dict:
    """Compose the run's config (Hydra overrides), build its frozen encoder, write the cache."""
    from hydra import compose, initialize_config_dir

    from blip2_train.config import CONF_DIR, normalize_overrides, register_configs
    from blip2_train.data.stages import expand_urls
    from blip2_train.models.encoders import build_image_encoder

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=normalize_overrides(list(sys.argv[1:] if argv is None else argv)))
    if not cfg.data.feature_cache:
        raise ValueError("set data.feature_cache=DIR: where the features go")
    urls = [u for s in cfg.data.sources for u in expand_urls(s.shards)] if cfg.data.sources else []
    if cfg.data.train_shards:
        urls += expand_urls(cfg.data.train_shards)
    if not urls:
        raise ValueError("no training shards: set data.train_shards or data.sources")
    use_gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    encoder = build_image_encoder(cfg.encoder, "cuda" if use_gpu else "cpu")
    summary = write_feature_cache(encoder, cfg.encoder, urls, cfg.data.feature_cache, cfg.data.eval_batch_size,
                                  cfg.data.max_words)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
