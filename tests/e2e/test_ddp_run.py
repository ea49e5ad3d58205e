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
