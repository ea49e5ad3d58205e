"""GPU smoke tests (bf16-mixed): stage 1 trains on one GPU, and under trainer=fsdp; skipped without CUDA."""

import csv
import math

import pytest
import torch
from test_stage1_run import make_cfg  # tests/e2e/ is on sys.path under pytest (this file's folder)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("trainer", ["gpu", "fsdp"])
def test_bf16_training_on_gpu(tmp_path, cache, trainer):
    from blip2_train.training.fit import train

    metrics = train(make_cfg(tmp_path, cache, f"trainer={trainer}", "trainer.accelerator=gpu",
                             "trainer.devices=1", "trainer.max_steps=20"))
    rows = list(csv.DictReader((tmp_path / "run" / "logs" / "metrics.csv").read_text().splitlines()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    memory = [float(r["train/gpu_mem_max_gb"]) for r in rows if r.get("train/gpu_mem_max_gb")]
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "precision: null" in config or "precision: bf16-mixed" in config
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # it learns in bf16
    assert memory and 0 < memory[-1] < 10
    assert metrics["global_step"] == 20 and "itc/txt_r1" in metrics
