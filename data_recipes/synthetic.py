#!/usr/bin/env python
"""Write synthetic image-caption shards (captions describe the images) in the img2dataset layout.

    python data_recipes/synthetic.py OUT_DIR --num-train 4000 --num-val 100 --image-size 64

-> OUT_DIR/train/00000.tar, ..., OUT_DIR/val/00000.tar, OUT_DIR/manifest.json. The embedded default
(data=synthetic) calls the same generator (blip2_train.data.synthetic) on first use.
"""

import argparse
import json
import sys
from pathlib import Path

try:
    from blip2_train.data.synthetic import write_synthetic_shards
except ImportError:  # run from a clone that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from blip2_train.data.synthetic import write_synthetic_shards

__all__ = ["main", "write_synthetic_shards"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    manifest = write_synthetic_shards(args.out_dir, args.num_train, args.num_val, args.image_size,
                                      args.samples_per_shard, args.seed)
    print(json.dumps(manifest, indent=2))
    return manifest


if __name__ == "__main__":
    main()
