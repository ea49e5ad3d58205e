"""SLURM: the dry run of a ``hydra/launcher=slurm`` submission (the job's topology: training/cluster.py).

    python -m blip2_train.slurm [overrides]      # prints the sbatch script; submits nothing

takes the overrides you would give ``python -m blip2_train -m hydra/launcher=slurm ...`` (for example
``experiment=blip2_vitg_stage1 trainer=ddp hydra.launcher.nodes=2 hydra.launcher.gpus_per_node=8``)
and prints the Lightning topology and the sbatch script that hydra-submitit-launcher would submit for
the first job, built by submitit itself from the same parameters.

In the job, one SLURM task runs per GPU (``tasks_per_node = gpus_per_node``), so Lightning must
see ``devices = tasks per node`` and ``num_nodes = nodes``: ``training.cluster.apply_slurm_topology``
sets them from SLURM's environment when the run is a SLURM job started by submitit.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf


def compose_submission(overrides: list[str]) -> DictConfig:
    """The primary config composed with ``hydra/launcher=slurm`` (and the hydra node kept)."""
    from hydra import compose, initialize_config_dir

    from blip2_train.config import CONF_DIR, normalize_overrides, register_configs

    register_configs()
    overrides = normalize_overrides([o for o in overrides if o not in ("-m", "--multirun")])
    if not any(o.startswith("hydra/launcher=") for o in overrides):
        overrides.append("hydra/launcher=slurm")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def sbatch_script(cfg: DictConfig, overrides: list[str]) -> tuple[str, dict]:
    """(sbatch script, submitit slurm parameters) as hydra-submitit-launcher would build them."""
    import submitit
    from hydra.core.hydra_config import HydraConfig
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm.slurm import _make_sbatch_string

    HydraConfig.instance().set_config(cfg)  # ${hydra:...} interpolations resolve against this cfg
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    launcher.pop("_target_", None)
    folder = launcher.pop("submitit_folder")
    init = {f"slurm_{k}": launcher.pop(k) for k in ("max_num_timeout",) if k in launcher}
    # submitit refuses to build a SLURM executor where there is no srun; a dry run needs none
    affinity = submitit.SlurmExecutor.affinity
    submitit.SlurmExecutor.affinity = classmethod(lambda cls: 1)
    try:
        executor = submitit.AutoExecutor(cluster="slurm", folder=folder, **init)
    finally:
        submitit.SlurmExecutor.affinity = affinity
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in launcher.items()})
    params = dict(executor._executor.parameters)  # what submitit passes to sbatch
    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command=command, folder=folder, **params), params


def main(argv: list[str] | None = None) -> None:
    overrides = sys.argv[1:] if argv is None else argv
    cfg = compose_submission(overrides)
    script, params = sbatch_script(cfg, overrides)
    nodes, tasks = params.get("nodes", 1), params.get("ntasks_per_node", 1)
    print(f"# dry run: nothing submitted. {nodes} node(s) x {tasks} task(s) = {nodes * tasks} processes; "
          f"in the job trainer.num_nodes={nodes}, trainer.devices={tasks}, trainer.strategy="
          f"{cfg.trainer.strategy}, experiment={cfg.experiment_name}")
    if nodes * tasks > 1 and cfg.trainer.strategy not in ("ddp", "fsdp"):
        print(f"# warning: {nodes * tasks} processes need trainer=ddp or trainer=fsdp", file=sys.stderr)
    print(script)


if __name__ == "__main__":
    main()
