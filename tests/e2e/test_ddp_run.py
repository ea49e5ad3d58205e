"""Multi-process runs on CPU (gloo): DDP through the real command line."""

import json
import os
import subprocess
import sys


def test_ddp_two_cpu_processes_write_one_run_dir(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "blip2_train", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.max_steps=2", "trainer.enable_progress_bar=false", f"run_dir={run}",
           f"cache_dir={tmp_path / 'cache'}", "data.num_workers=0", "data.batch_size=4",
           "data.synthetic.num_train=32", "data.synthetic.num_val=8", "data.synthetic.samples_per_shard=16",
           "data.samples_per_epoch=32", "retrieval.k_test=4", "qformer.num_hidden_layers=2"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("BLIP2_RUN_DIR", None)
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and "itc/txt_r1" in metrics
    assert metrics["data/seen_samples"] == 2 * 4 * 2 and metrics["data/skipped_samples"] == 0  # summed over ranks
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]  # no per-process dirs


def test_the_pre_timeout_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """SLURM signals each task on its own; here only rank 1 gets the pre-timeout signal. Saving is
    collective, so every rank must stop at the same step: rank 0 learns of it through the per-step flag
    reduction, saves with rank 1 and calls the requeue. Without the reduction rank 1 saves alone and the
    job hangs (gloo waits 30 minutes)."""
    import contextlib
    import time
    from pathlib import Path

    import torch
    from signal_runs import start_slurm_run

    from blip2_train.training.cluster import requeue_signal

    run = tmp_path / "run"
    proc, lines, armed, reader, calls = start_slurm_run(tmp_path, [
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=1000",
        "checkpoint.every_n_steps=1000", "trainer.enable_progress_bar=false", f"run_dir={run}",
        f"cache_dir={tmp_path / 'cache'}", "data.num_workers=0", "data.batch_size=4", "data.synthetic.num_train=32",
        "data.synthetic.num_val=8", "data.synthetic.samples_per_shard=16", "data.samples_per_epoch=32",
        "retrieval.k_test=4", "qformer.num_hidden_layers=2", "trainer.val_check_interval=1000"])
    children = []
    try:
        assert armed.wait(240), "".join(lines)[-3000:]
        time.sleep(4)  # a few training steps on both ranks
        children = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(children) == 1, children  # rank 1, launched by rank 0
        os.kill(children[0], requeue_signal())
        proc.wait(timeout=240)
    finally:
        for pid in children if proc.poll() is None else []:  # a hung rank 1 would outlive rank 0
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=30)
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]
    steps = {int(line.split("stopping at step ")[1].split()[0]) for line in lines if "after a signal" in line}
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert len(steps) == 1 and 0 < saved < 1000 and steps == {saved}, (steps, saved, out[-2000:])
    assert calls.read_text().split() == ["requeue", "4242"]  # once, by rank 0, which got no signal itself
