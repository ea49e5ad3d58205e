#!/usr/bin/env python
"""Write synthetic image-caption shards (captions describe the images) in the img2dataset layout.

    python data_recipes/synthetic.py OUT_DIR --num-train 4000 --num-val 100 --image-size 64

The embedded default (data=synthetic) calls the same generator on first use.
"""

import argparse
import json

from blip2_train.data.synthetic import write_synthetic_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    manifest = write_synthetic_shards(args.out_dir, args.num_train, args.num_val, args.image_size,
                                      args.samples_per_shard, args.seed)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
