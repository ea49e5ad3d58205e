"""hydra/launcher=slurm: the dry run prints submitit's sbatch script; the job's topology follows SLURM."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from blip2_train.training.cluster import apply_slurm_topology


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


def test_the_submitted_signal_is_the_one_the_trainer_handles():
    from blip2_train.slurm import compose_submission, sbatch_script
    from blip2_train.training.cluster import requeue_signal

    cfg = compose_submission(["experiment=smoke"])
    script, _ = sbatch_script(cfg, [])
    line = next(x for x in script.splitlines() if x.startswith("#SBATCH --signal="))
    assert line == f"#SBATCH --signal={requeue_signal().name[3:]}@{cfg.hydra.launcher.signal_delay_s}"


def test_slurm_pre_timeout_signal_checkpoints_at_that_step_and_requeues(tmp_path):
    """SLURM's pre-timeout signal sent to a running ``python -m blip2_train``: last.ckpt is written at
    the step it stopped at, and ``scontrol requeue $SLURM_JOB_ID`` is called (a fake scontrol)."""
    import csv
    import time

    import torch
    from signal_runs import start_slurm_run

    from blip2_train.training.cluster import requeue_signal

    run = tmp_path / "run"
    proc, lines, armed, reader, calls = start_slurm_run(tmp_path, [
        f"run_dir={run}", f"cache_dir={tmp_path / 'cache'}", "trainer.max_steps=1000", "checkpoint.every_n_steps=1000",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "data.batch_size=8", "data.num_workers=0",
        "data.synthetic.num_train=64", "data.synthetic.num_val=8", "data.synthetic.samples_per_shard=32",
        "data.samples_per_epoch=64", "qformer.num_hidden_layers=2", "retrieval.k_test=4"])
    try:
        assert armed.wait(180), "".join(lines)[-3000:]
        time.sleep(3)  # a few training steps
        proc.send_signal(requeue_signal())
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=30)
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]
    stopped = [line for line in lines if "after a signal" in line]
    assert stopped, out[-3000:]
    step = int(stopped[0].split("stopping at step ")[1].split()[0])
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    logged = [int(r["step"]) for r in csv.DictReader((run / "logs" / "metrics.csv").read_text().splitlines()) if r.get("train/loss")]
    assert 0 < step < 1000 and saved == step and max(logged) + 1 == step, (step, saved, logged[-3:])
    assert calls.read_text().split() == ["requeue", "4242"]
