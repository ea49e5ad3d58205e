"""``python -m blip2_train.bench``: see blip2_train/bench/harness.py."""

from blip2_train.bench.harness import main

if __name__ == "__main__":
    main()
