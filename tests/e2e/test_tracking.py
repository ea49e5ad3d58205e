"""Throughput, lr and temperature in the logs; the validation table in run_dir and in offline wandb."""

import csv
import json

import pytest
from test_stage1_run import make_cfg  # tests/e2e/ is on sys.path under pytest (this file's folder)


def test_csv_logs_throughput_and_the_validation_table(tmp_path, cache):
    from blip2_train.training.fit import train

    train(make_cfg(tmp_path, cache, "trainer.max_steps=3", "trainer.val_check_interval=3"))
    run = tmp_path / "run"
    rows = list(csv.DictReader((run / "logs" / "metrics.csv").read_text().splitlines()))

    def values(name):
        return [float(r[name]) for r in rows if r.get(name)]

    samples, tokens = values("train/samples_per_s"), values("train/tokens_per_s")
    assert len(samples) == 3 and all(s > 0 for s in samples)
    # synthetic captions are 8-20 tokens of 32 at most: tokens/s is a few times samples/s
    assert all(2 * s < t < 32 * s for s, t in zip(samples, tokens))
    assert values("train/lr")[0] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0 / 50, rel=1e-6)
    assert values("train/temp")[0] == pytest.approx(0.07, rel=1e-3)
    table = [json.loads(line) for line in (run / "val_samples.jsonl").read_text().splitlines()]
    assert len(table) == 4 and {r["step"] for r in table} == {3}
    val_captions = {r["caption"] for r in table}
    assert all(set(r) == {"step", "key", "caption", "top_retrieved_caption"} for r in table)
    assert all(isinstance(r["top_retrieved_caption"], str) and r["top_retrieved_caption"] for r in table)
    assert val_captions and all(r["key"] for r in table)


def test_offline_wandb_gets_the_validation_table(tmp_path, cache, monkeypatch):
    from blip2_train.training.fit import train

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    train(make_cfg(tmp_path, cache, "logger=wandb", "trainer.max_steps=1"))
    tables = list((tmp_path / "run" / "wandb").rglob("*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["image", "key", "caption", "top_retrieved_caption"] and len(table["data"]) == 4


def test_tensorboard_gets_the_validation_table_as_markdown(tmp_path, cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from blip2_train.training.fit import train

    train(make_cfg(tmp_path, cache, "logger=tensorboard", "trainer.max_steps=1"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    (event,) = events.Tensors("val/samples/text_summary")
    markdown = event.tensor_proto.string_val[0].decode()
    lines = markdown.splitlines()
    assert lines[0] == "| key | caption | top_retrieved_caption |" and len(lines) == 2 + 4
