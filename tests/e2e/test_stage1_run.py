"""End-to-end stage-1 runs on tiny models: pinned losses, checkpoint reload, resume, init_from."""

import csv
import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from blip2_train.config import CONF_DIR, normalize_overrides, register_configs

register_configs()

# First three training losses of the seeded tiny run below (CPU, fp32). A change of numerics,
# data order or initialisation moves them; update only for a deliberate change.
# (Re-pinned when the last Q-Former layer began computing only the rows ITM and ITC read: fewer
# packed dropout draws, so the draws after them moved. Re-pinned again when training crops began
# drawing from a generator of their own per (seed, rank, worker, epoch) instead of the global one
# the dropout and ITM draws share, which exact resume needs (issue 17).)
PINNED_LOSSES = [7.902665138244629, 7.835169792175293, 8.027620315551758]
# The same run with torch's dropout draws and the for-loop AdamW (qformer.dropout_masks=torch
# optim.implementation=for_loop): LAVIS's draws (re-pinned with the crops' own generator, issue 17).
PINNED_LOSSES_TORCH_MASKS = [8.006505012512207, 7.890390872955322, 7.90909481048584]


def make_cfg(tmp_path, cache, *overrides):
    base = [f"run_dir={tmp_path / 'run'}", f"cache_dir={cache}", "trainer.max_steps=3", "trainer=cpu",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "data.batch_size=8",
            "data.eval_batch_size=16", "data.num_workers=0", "data.synthetic.num_train=64",
            "data.synthetic.num_val=16", "data.synthetic.samples_per_shard=32", "data.samples_per_epoch=64",
            "retrieval.k_test=4", "qformer.num_hidden_layers=2"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=normalize_overrides(base + list(overrides)))


def train_rows(run_dir):
    """The metrics.csv rows that carry a training loss."""
    rows = csv.DictReader((run_dir / "logs" / "metrics.csv").read_text().splitlines())
    return [r for r in rows if r.get("train/loss")]


def losses_of(run_dir):
    return [float(r["train/loss"]) for r in train_rows(run_dir)]


def test_seeded_tiny_run_pins_losses_and_reloads_exactly(tmp_path, cache):
    from blip2_train.evaluate import evaluate
    from blip2_train.training.fit import train

    cfg = make_cfg(tmp_path, cache)
    metrics = train(cfg)
    run = tmp_path / "run"
    losses = losses_of(run)
    print("losses", losses)
    assert losses[:3] == pytest.approx(PINNED_LOSSES, rel=1e-4)
    assert metrics["global_step"] == 3 and metrics["resumed_from_step"] == 0
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == metrics and "itm/img_r1" in saved and "itc/txt_r10" in saved
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "last.ckpt").exists()
    result = evaluate(str(run / "checkpoints" / "last.ckpt"), output=str(tmp_path / "eval.json"))
    for name, value in result["metrics"].items():
        assert value == pytest.approx(saved[name], abs=1e-6), name
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"] == result["metrics"]


def test_same_run_dir_resumes_from_last_checkpoint(tmp_path, cache):
    from blip2_train.training.fit import train

    first = train(make_cfg(tmp_path, cache, "trainer.max_steps=2"))
    assert first["global_step"] == 2
    second = train(make_cfg(tmp_path, cache, "trainer.max_steps=4"))
    assert second["global_step"] == 4 and second["resumed_from_step"] == 2
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4


def test_init_from_reports_matched_keys(tmp_path, cache, capsys):
    from blip2_train.training.fit import train

    train(make_cfg(tmp_path / "a", cache, "trainer.max_steps=1"))
    ckpt = tmp_path / "a" / "run" / "checkpoints" / "last.ckpt"
    cfg = make_cfg(tmp_path / "b", cache, "trainer.max_steps=0", f"init_from={ckpt}")
    metrics = train(cfg)
    out = capsys.readouterr().out
    assert "matched, 0 missing, 0 unexpected" in out
    before = json.loads((tmp_path / "a" / "run" / "metrics.json").read_text())
    assert metrics["itc/txt_r1"] == before["itc/txt_r1"] and metrics["itm/img_r5"] == before["itm/img_r5"]
    assert (tmp_path / "b" / "run" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize("logger", ["wandb", "tensorboard"])
def test_loggers_write_under_run_dir_and_wandb_keeps_its_run_on_resume(tmp_path, cache, logger, monkeypatch):
    from blip2_train.training.fit import train

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    train(make_cfg(tmp_path, cache, f"logger={logger}", "trainer.max_steps=1"))
    run = tmp_path / "run"
    if logger == "tensorboard":
        assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
        return
    run_id = (run / "wandb_id.txt").read_text().strip()
    assert list((run / "wandb").glob(f"offline-run-*-{run_id}"))  # offline by default
    metrics = train(make_cfg(tmp_path, cache, f"logger={logger}", "trainer.max_steps=2"))
    assert metrics["resumed_from_step"] == 1
    assert (run / "wandb_id.txt").read_text().strip() == run_id
    runs = {p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")}
    assert runs == {run_id}  # the resumed run logs to the same wandb run


def test_torch_dropout_masks_give_the_earlier_pinned_losses(tmp_path, cache):
    """qformer.dropout_masks=torch keeps torch's (LAVIS's) dropout draws: the losses pinned before packed masks."""
    from blip2_train.training.fit import train

    train(make_cfg(tmp_path, cache, "qformer.dropout_masks=torch", "optim.implementation=for_loop"))
    assert losses_of(tmp_path / "run")[:3] == pytest.approx(PINNED_LOSSES_TORCH_MASKS, rel=1e-4)


@pytest.mark.slow
def test_compiled_qformer_trains_with_the_eager_losses(tmp_path, cache):
    """trainer.compile=true (torch.compile of the Q-Former, minutes of compilation on CPU): same losses
    as eager. Dropout off: compiled code draws its masks with inductor's generator."""
    from blip2_train.training.fit import train

    no_dropout = ["qformer.hidden_dropout_prob=0", "qformer.attention_probs_dropout_prob=0"]
    train(make_cfg(tmp_path / "eager", cache, *no_dropout))
    train(make_cfg(tmp_path / "compiled", cache, "trainer.compile=true", *no_dropout))
    eager, compiled = (losses_of(tmp_path / name / "run") for name in ("eager", "compiled"))
    assert len(compiled) >= 3 and compiled[:3] == pytest.approx(eager[:3], rel=1e-4)
    state = torch.load(tmp_path / "compiled" / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert "model.qformer.encoder.layer.0.attention.attention.query.weight" in state  # names unchanged


def test_mixed_sources_run_logs_the_samples_of_each_source(tmp_path, cache):
    from blip2_train.data.synthetic import write_synthetic_shards
    from blip2_train.training.fit import train

    for name, seed in (("a", 1), ("b", 2)):
        write_synthetic_shards(tmp_path / name, num_train=32, num_val=0, image_size=32, samples_per_shard=16,
                               seed=seed)
    sources = (f"data.sources=[{{name: coco, shards: '{tmp_path / 'a' / 'train'}', weight: 1}}, "
               f"{{name: cc3m, shards: '{tmp_path / 'b' / 'train'}', weight: 3}}]")
    metrics = train(make_cfg(tmp_path, cache, sources, "trainer.max_steps=4"))
    coco, cc3m = metrics["data/source_coco_samples"], metrics["data/source_cc3m_samples"]
    assert coco + cc3m == metrics["data/seen_samples"] == 4 * 8 and cc3m > coco  # 32 draws at 3:1
    logged = [float(r["data/source_coco_samples"]) + float(r["data/source_cc3m_samples"])
              for r in train_rows(tmp_path / "run")]
    assert logged == [8.0, 16.0, 24.0, 32.0]  # running totals, logged at every log step
