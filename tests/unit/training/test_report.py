"""The ablation report: a fake sweep directory with known numbers gives the hand means and spreads."""

import json
import math
import subprocess
import sys

import pytest
import yaml

from blip2_train.training.sweep_report import arm_name, mean_spread, read_sweep, summarise, write_report


def fake_run(path, bridge, tokens, lr, seed, loss, cider, curve, speed=10.0, stage1_steps=0):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"bridge": {"name": bridge, "stage1_steps": stage1_steps},
                                                      "optim": {"lr": lr}, "seed": seed}))
    metrics = {"val/loss": loss, "cider": cider, "bridge/visual_tokens": tokens, "bridge/trainable_params": 1000.0,
               "train/samples_per_s_mean": speed, "train/llm_tokens_per_s_mean": speed * 50,
               "val/attr_acc": cider / 2, "val/count_acc": 0.5,
               "val/hallucination": 0.1, "global_step": 20}
    (path / "metrics.json").write_text(json.dumps(metrics))
    (path / "logs").mkdir()
    rows = "\n".join(f"{s},{v},0" for s, v in curve)
    (path / "logs" / "metrics.csv").write_text(f"step,val/loss,epoch\n{rows}\n")


@pytest.fixture
def sweep(tmp_path):
    # qformer 4 tokens: lr 1e-3 (seeds 0, 1) beats lr 3e-3 (worse loss); pool_mlp 4 tokens: one lr, 3 seeds
    fake_run(tmp_path / "0", "qformer", 4, 1e-3, 0, 2.0, 0.30, [(10, 3.0), (20, 2.0)])
    fake_run(tmp_path / "1", "qformer", 4, 1e-3, 1, 2.2, 0.40, [(10, 3.2), (20, 2.2)])
    fake_run(tmp_path / "2", "qformer", 4, 3e-3, 0, 2.5, 0.90, [(10, 3.5), (20, 2.5)])
    for i, (loss, cider) in enumerate([(1.0, 0.5), (1.5, 0.7), (2.0, 0.9)]):
        fake_run(tmp_path / str(3 + i), "pool_mlp", 4, 3e-3, i, loss, cider, [(10, loss + 1), (20, loss)], 20.0 + i)
    # the Q-Former from its stage 1: its own arm beside the one from scratch
    fake_run(tmp_path / "6", "qformer", 4, 1e-3, 0, 1.2, 0.6, [(10, 2.0), (20, 1.2)], stage1_steps=300)
    fake_run(tmp_path / "7", "qformer", 4, 1e-3, 1, 1.4, 0.8, [(10, 2.2), (20, 1.4)], stage1_steps=300)
    (tmp_path / "9").mkdir()  # an unfinished job: no metrics.json, skipped
    return tmp_path


def test_rows_are_hand_means_and_spreads_at_each_arms_best_lr(sweep):
    rows = {(r["bridge"], r["tokens"]): r for r in summarise(read_sweep(sweep))}
    q = rows[("qformer (scratch)", 4)]
    assert q["lr"] == 1e-3 and q["lrs"] == [1e-3, 3e-3] and q["seeds"] == 2
    assert q["val/loss"] == pytest.approx((2.1, math.sqrt(((2.0 - 2.1) ** 2 + (2.2 - 2.1) ** 2) / 1)))
    assert q["cider"] == pytest.approx((0.35, math.sqrt(2 * 0.05 ** 2)))  # the 3e-3 run's 0.9 is not in it
    p = rows[("pool_mlp", 4)]
    assert p["val/loss"] == pytest.approx((1.5, 0.5)) and p["train/samples_per_s_mean"] == pytest.approx((21.0, 1.0))
    assert rows[("qformer (stage 1)", 4)]["val/loss"] == pytest.approx((1.3, math.sqrt(2 * 0.1 ** 2)))
    assert rows[("qformer (stage 1)", 4)]["seeds"] == 2 and len(rows) == 3
    assert arm_name({"bridge": {"name": "qformer"}, "init_from": "s1.ckpt"}) == "qformer (init_from)"
    assert mean_spread([4.0]) == (4.0, 0.0)


def test_report_command_writes_the_table_and_plots(sweep):
    done = subprocess.run([sys.executable, "-m", "blip2_train.report", str(sweep)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    table = (sweep / "report.md").read_text()
    assert ("| pool_mlp | 4 | 0.003 (0.003) | 3 | 1,000 ± 0 | 21.0 ± 1.0 | 1,050 ± 50 | 1.500 ± 0.500 | 0.700 ± 0.200 |"
            in table)
    assert "| qformer (scratch) | 4 | 0.001 (0.001, 0.003) | 2 |" in table and "2.100 ± 0.141" in table
    assert "| qformer (stage 1) | 4 | 0.001 (0.001) | 2 |" in table and "1.300 ± 0.141" in table
    for name in ("val_loss_vs_step.png", "quality_vs_tokens.png", "quality_vs_samples_per_s.png"):
        assert (sweep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| pool_mlp | 4 |" in done.stdout


def test_an_empty_sweep_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no finished runs"):
        write_report(tmp_path)
