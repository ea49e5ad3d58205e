"""A run inside a SLURM job started by submitit: the signal SLURM sends before the time limit, and the
Lightning topology from SLURM's environment (``python -m blip2_train.slurm`` prints the submission).

In the job, one SLURM task runs per GPU (``tasks_per_node = gpus_per_node``), so Lightning must
see ``devices = tasks per node`` and ``num_nodes = nodes``: :func:`apply_slurm_topology` sets them
from SLURM's environment when the run is a SLURM job started by submitit.
"""

from __future__ import annotations

import os
import signal

from omegaconf import DictConfig, open_dict


def requeue_signal() -> signal.Signals:
    """The signal SLURM sends before a job's time limit: the one submitit puts in ``#SBATCH --signal``
    (``SIG`` + ``$SUBMITIT_PREEMPT_SIGNAL``, USR2 unless set; ``hydra.launcher.signal_delay_s`` seconds
    ahead). The checkpoint callback saves and requeues on it, so the two cannot disagree."""
    try:
        from submitit import JobEnvironment

        name = JobEnvironment.USR_SIG  # what submitit's sbatch line and its own handler use
    except ImportError:  # submitit not installed: its default
        name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    sig = getattr(signal, "SIG" + name, None)
    if sig is None:
        raise ValueError(f"SUBMITIT_PREEMPT_SIGNAL={name} names no signal; use USR2 (submitit's default) or USR1")
    return sig


def apply_slurm_topology(cfg: DictConfig, env=os.environ) -> bool:
    """In a submitit SLURM job with several tasks: trainer.devices / num_nodes from SLURM. Returns
    whether it applied. A value set by hand that disagrees with the allocation is an error."""
    if env.get("SUBMITIT_EXECUTOR") != "slurm" or "SLURM_NTASKS_PER_NODE" not in env:
        return False
    tasks = int(env["SLURM_NTASKS_PER_NODE"].split("(")[0])  # "8" or "8(x2)"
    nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    t = cfg.trainer
    if t.devices not in ("auto", tasks) or (t.num_nodes != 1 and t.num_nodes != nodes):
        raise ValueError(f"trainer.devices={t.devices} / trainer.num_nodes={t.num_nodes} disagree with the SLURM "
                         f"allocation ({tasks} tasks per node on {nodes} nodes): leave them at auto / 1, or "
                         f"change hydra.launcher.gpus_per_node / hydra.launcher.nodes")
    if (tasks > 1 or nodes > 1) and t.strategy not in ("ddp", "fsdp"):
        raise ValueError(f"{tasks} tasks per node x {nodes} nodes need trainer=ddp or trainer=fsdp, "
                         f"got trainer.strategy={t.strategy}")
    with open_dict(cfg):
        t.devices, t.num_nodes = tasks, nodes
    return True
