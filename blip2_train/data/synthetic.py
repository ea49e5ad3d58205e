"""Synthetic image-caption shards whose captions describe the image, so learning is measurable.

Each image is a coloured background with one shape of a colour, a size and a vertical position;
the caption names all five, e.g. "a large red circle at the top on a green background". No
left/right words: training flips images horizontally. 10 x 9 x 6 x 2 x 3 = 3240 captions, so 100
val captions are nearly all distinct; shape size and horizontal position are jittered, so no val
image repeats a train image. Written in the img2dataset layout (``{key}.png``, ``{key}.txt``,
``{key}.json`` with ``image_id`` and the drawn attributes), plus ``manifest.json``; 4000 64-px
samples take about 2 s.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tarfile
import uuid
from pathlib import Path

from PIL import Image, ImageDraw

from blip2_train.data.shapes import COLORS, POSITIONS, SHAPES, SIZES
from blip2_train.data.shapes import draw_shape as _draw_shape


def random_caption(rng: random.Random) -> str:
    """A caption of the synthetic language without its image (to teach a tiny LLM the language)."""
    background = rng.choice(list(COLORS))
    color = rng.choice([c for c in COLORS if c != background])
    return (f"a {rng.choice(list(SIZES))} {color} {rng.choice(SHAPES)} at the "
            f"{rng.choice(list(POSITIONS))} on a {background} background")


def render_sample(rng: random.Random, size: int) -> tuple[Image.Image, str, dict]:
    """One random image, its caption and the attributes it was drawn from."""
    names = list(COLORS)
    background = rng.choice(names)
    color = rng.choice([c for c in names if c != background])
    shape, scale, position = rng.choice(SHAPES), rng.choice(list(SIZES)), rng.choice(list(POSITIONS))
    image = Image.new("RGB", (size, size), COLORS[background])
    draw = ImageDraw.Draw(image)
    r = SIZES[scale] * size / 2 * rng.uniform(0.85, 1.1)
    cx = size / 2 + rng.uniform(-0.22, 0.22) * size
    cy = POSITIONS[position] * size + rng.uniform(-0.05, 0.05) * size
    _draw_shape(draw, shape, cx, cy, r, COLORS[color])
    caption = f"a {scale} {color} {shape} at the {position} on a {background} background"
    attrs = {"background": background, "color": color, "shape": shape, "size": scale, "position": position}
    return image, caption, attrs


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # mtime 0: same seed, same bytes
    tar.addfile(info, io.BytesIO(data))


def _renderer(kind: str):
    """``data.synthetic.kind``: shapes (one shape, this file) or scenes (data/synthetic_scenes.py)."""
    if kind == "shapes":
        return render_sample
    if kind == "scenes":
        from blip2_train.data.synthetic_scenes import render_scene

        return render_scene
    raise ValueError(f"data.synthetic.kind={kind!r} is not valid; choose one of: shapes, scenes")


def _write_split(out_dir: Path, count: int, start_id: int, image_size: int, per_shard: int,
                 rng: random.Random, render=render_sample) -> int:
    """``count`` samples into ``out_dir/00000.tar``, ...; returns the number of shards."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for shard_index, first in enumerate(range(0, count, per_shard)):
        with tarfile.open(out_dir / f"{shard_index:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for image_id in range(start_id + first, start_id + min(first + per_shard, count)):
                image, caption, attrs = render(rng, image_size)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG", compress_level=1)  # lossless either way; 1 is fastest
                key = f"{image_id:09d}"
                _add_member(tar, f"{key}.png", buffer.getvalue())
                _add_member(tar, f"{key}.txt", caption.encode())
                _add_member(tar, f"{key}.json",
                            json.dumps({"image_id": image_id, "caption": caption, **attrs}).encode())
    return -(-count // per_shard)


def write_synthetic_shards(out_dir: str | os.PathLike, num_train: int = 4000, num_val: int = 100,
                           image_size: int = 64, samples_per_shard: int = 500, seed: int = 0,
                           kind: str = "shapes") -> dict:
    """Write ``out_dir/{train,val}/00000.tar, ...`` and ``out_dir/manifest.json``; returns the manifest.

    Written into a temporary sibling and renamed, so concurrent writers (DDP ranks) are safe: the
    first rename wins and the others keep its copy. Train image ids are 0..num_train-1, val ids follow.
    """
    if min(num_train, num_val) < 0 or samples_per_shard < 1 or image_size < 8:
        raise ValueError(f"need num_train, num_val >= 0, samples_per_shard >= 1, image_size >= 8; got "
                         f"{num_train}, {num_val}, {samples_per_shard}, {image_size}")
    out_dir = Path(out_dir)
    render = _renderer(kind)
    params = {"num_train": num_train, "num_val": num_val, "image_size": image_size,
              "samples_per_shard": samples_per_shard, "seed": seed}
    if kind != "shapes":
        params["kind"] = kind
    if out_dir.exists() and any(out_dir.iterdir()):
        existing = read_manifest(out_dir)
        if existing is not None and existing.get("params") == params:
            return existing
        raise FileExistsError(f"{out_dir} exists and is not a synthetic set with {params}: remove it or "
                              f"choose another directory")
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    rng = random.Random(seed)
    manifest = {
        "train": {"samples": num_train,
                  "shards": _write_split(tmp / "train", num_train, 0, image_size, samples_per_shard, rng,
                                             render)},
        "val": {"samples": num_val,
                "shards": _write_split(tmp / "val", num_val, num_train, image_size, samples_per_shard, rng,
                                           render)},
        "image_size": image_size, "seed": seed, "skipped": 0, "params": params,
    }
    return publish_shards(tmp, out_dir, manifest)


def publish_shards(tmp: Path, out_dir: Path, manifest: dict) -> dict:
    """Write ``manifest.json`` into the finished ``tmp`` dir and rename it to ``out_dir`` (atomic). When
    another writer's copy is already in place, keep it if its parameters are the same, else fail."""
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out_dir)  # atomic; fails when another writer's copy is already in place
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        existing = read_manifest(out_dir)
        if existing is None or existing.get("params") != manifest["params"]:
            raise
        return existing
    return manifest


def read_manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def synthetic_dir(cfg) -> Path:
    """Where the set described by ``cfg`` (a SyntheticConfig) lives: one dir per parameter set."""
    name = f"n{cfg.num_train}-{cfg.num_val}-s{cfg.image_size}-k{cfg.samples_per_shard}-seed{cfg.seed}-v1"
    kind = getattr(cfg, "kind", "shapes")
    if kind != "shapes":
        name = f"{kind}-{name}"
    return Path(cfg.cache_dir) / name


def ensure_synthetic_shards(cfg) -> tuple[str, str]:
    """Generate the synthetic set described by ``cfg`` once; return its train and val dirs."""
    root = synthetic_dir(cfg)
    if not (root / "manifest.json").exists():
        write_synthetic_shards(root, cfg.num_train, cfg.num_val, cfg.image_size, cfg.samples_per_shard,
                               cfg.seed, getattr(cfg, "kind", "shapes"))
    return str(root / "train"), str(root / "val")
