"""``python -m blip2_train [overrides]``: compose the Hydra config, build, fit.

With no overrides this is the embedded default (experiment=smoke): stage 1 with a tiny frozen EVA
and a tiny Q-Former on synthetic shards, on CPU, in a few minutes.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from blip2_train.config import CONF_DIR, normalize_overrides, register_configs

register_configs()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from blip2_train.training.fit import train

    # A multirun job (-m) writes to run_dir/<job number>: Hydra's output dir for this job.
    with open_dict(cfg):
        cfg.run_dir = HydraConfig.get().runtime.output_dir
    train(cfg)


if __name__ == "__main__":
    sys.argv[1:] = normalize_overrides(sys.argv[1:])
    main()
