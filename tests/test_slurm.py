"""hydra/launcher=slurm: the dry run prints submitit's sbatch script; the job's topology follows SLURM."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from blip2_train.slurm import apply_slurm_topology


def test_dry_run_prints_the_sbatch_submission(tmp_path):
    cmd = [sys.executable, "-m", "blip2_train.slurm", "experiment=blip2_vitg_stage1", "trainer=ddp",
           "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4", "hydra.launcher.timeout_min=600",
           f"run_dir={tmp_path / 'sweep'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "2 node(s) x 4 task(s) = 8 processes; in the job trainer.num_nodes=2, trainer.devices=4" in out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --mem=400GB", "#SBATCH --time=600",
                 "#SBATCH --signal=USR2@120", "#SBATCH --job-name=blip2_train",
                 f"#SBATCH --output={tmp_path / 'sweep'}/.submitit/%j/%j_0_log.out"):
        assert line in out.splitlines(), line
    assert "srun --unbuffered" in out and "submitit.core._submit" in out
    assert not (tmp_path / "sweep").exists()  # nothing written, nothing submitted


def _cfg(devices="auto", num_nodes=1, strategy="ddp"):
    return OmegaConf.create({"trainer": {"devices": devices, "num_nodes": num_nodes, "strategy": strategy}})


def test_job_topology_comes_from_the_slurm_allocation():
    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_NUM_NODES": "2"}
    cfg = _cfg()
    assert apply_slurm_topology(cfg, env)
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 2)
    assert not apply_slurm_topology(cfg := _cfg(), {"SLURM_NTASKS_PER_NODE": "4"})  # not a submitit job
    assert cfg.trainer.devices == "auto"
    with pytest.raises(ValueError, match="disagree with the SLURM allocation"):
        apply_slurm_topology(_cfg(devices=2), env)
    with pytest.raises(ValueError, match="need trainer=ddp or trainer=fsdp"):
        apply_slurm_topology(_cfg(strategy="auto"), env)
