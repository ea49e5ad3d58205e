"""A non-finite loss skips its update and too many in a row stop the run; checkpoint.every_n_steps."""

import csv

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from test_stage1_run import make_cfg  # tests/e2e/ is on sys.path under pytest (this file's folder)
from tiny_runs import train_with_callback


def poison(monkeypatch, bad_steps):
    """Make the training loss NaN at the given global steps (as a bad batch would)."""
    from blip2_train.training.stage1 import Stage1Module

    original = Stage1Module.stage1_losses

    def losses(self, batch):
        out = original(self, batch)
        if bad_steps is None or self.global_step in bad_steps:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Stage1Module, "stage1_losses", losses)


class WeightsAroundStep(Callback):
    """Trainable weights before and after the update of one batch."""

    def __init__(self, batch_idx):
        self.batch_idx, self.before, self.after = batch_idx, None, None

    def _copy(self, module):
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.batch_idx:
            self.before = self._copy(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.batch_idx:
            self.after = self._copy(module)




def test_nonfinite_loss_skips_the_update_and_is_counted(tmp_path, cache, monkeypatch, caplog):
    poison(monkeypatch, {1})
    bad = WeightsAroundStep(1)
    train_with_callback(make_cfg(tmp_path, cache, "trainer.max_steps=3"), bad)
    assert bad.before and all(torch.equal(bad.before[n], bad.after[n]) for n in bad.before)
    assert "non-finite loss" in caplog.text and "batch keys: [" in caplog.text  # the samples are named
    rows = list(csv.DictReader((tmp_path / "run" / "logs" / "metrics.csv").read_text().splitlines()))
    counts = [float(r["train/nonfinite_steps"]) for r in rows if r.get("train/nonfinite_steps")]
    assert counts == [0.0, 1.0, 1.0]
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses[0] == losses[0] and losses[2] == losses[2]  # finite around the bad step
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(ckpt["state_dict"]["nonfinite_steps"]) == 1


def test_a_finite_step_updates_the_weights(tmp_path, cache):
    good = WeightsAroundStep(1)
    train_with_callback(make_cfg(tmp_path, cache, "trainer.max_steps=2"), good)
    changed = [n for n in good.before if not torch.equal(good.before[n], good.after[n])]
    assert len(changed) == len(good.before)


def test_too_many_nonfinite_losses_in_a_row_stop_the_run(tmp_path, cache, monkeypatch):
    from blip2_train.training.fit import train

    poison(monkeypatch, None)
    with pytest.raises(RuntimeError, match=r"3 non-finite losses in a row \(trainer.max_nonfinite_steps=3\)"):
        train(make_cfg(tmp_path, cache, "trainer.max_steps=10", "trainer.max_nonfinite_steps=3"))


def test_checkpoint_every_n_steps_writes_last_ckpt_at_those_steps(tmp_path, cache):
    saved = []

    class RecordSaves(Callback):
        def on_save_checkpoint(self, trainer, module, checkpoint):
            saved.append(checkpoint["global_step"])

    train_with_callback(make_cfg(tmp_path, cache, "trainer.max_steps=5", "checkpoint.every_n_steps=2"), RecordSaves())
    assert saved == [2, 4, 5]  # every 2 steps, and at the end
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 5


def _skip_worker(rank, world, port, cache, out):
    import os

    import torch.distributed as dist
    from test_fsdp import _module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    module = _module(cache, "1")
    nan_on_rank0 = torch.tensor(float("nan") if rank == 0 else 1.0)
    out[rank] = [module.finite_or_skip(nan_on_rank0, {"key": [f"r{rank}"]}) is None, int(module.nonfinite_steps),
                 module.finite_or_skip(torch.tensor(2.0), {}) is None]
    dist.destroy_process_group()


def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(cache, free_port):
    import torch.multiprocessing as mp
    from test_fsdp import _module

    _module(cache, "1")  # the tiny tokenizer, written once
    out = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_skip_worker, args=(2, free_port, str(cache), out), nprocs=2, start_method="spawn")
    assert out[0] == out[1] == [True, 1, False]  # both skip, both count it; then both step again


STAGE2 = ["stage=2", "llm=tiny_opt", "llm.tiny.pretrain_steps=0", "generation.num_beams=1",
          "generation.max_new_tokens=3", "generation.min_new_tokens=1"]


def test_stage2_nonfinite_loss_skips_the_update_and_is_counted(tmp_path, cache, monkeypatch):
    """Stage 2: a NaN language-model loss at step 1 leaves every trainable weight (Q-Former and
    projection) as it was, is counted, and the steps around it train."""
    from blip2_train.training.stage2 import Stage2Module

    original = Stage2Module.lm_loss

    def lm_loss(self, prompts, batch):
        loss = original(self, prompts, batch)
        return loss * float("nan") if self.training and self.global_step == 1 else loss

    monkeypatch.setattr(Stage2Module, "lm_loss", lm_loss)
    bad, good = WeightsAroundStep(1), WeightsAroundStep(2)

    class Both(Callback):
        def on_train_batch_start(self, *args):
            bad.on_train_batch_start(*args)
            good.on_train_batch_start(*args)

        def on_train_batch_end(self, *args):
            bad.on_train_batch_end(*args)
            good.on_train_batch_end(*args)

    train_with_callback(make_cfg(tmp_path, cache, "trainer.max_steps=3", *STAGE2), Both())
    assert any(n.startswith("language_projection.") for n in bad.before)
    assert bad.before and all(torch.equal(bad.before[n], bad.after[n]) for n in bad.before)
    assert all(not torch.equal(good.before[n], good.after[n]) for n in good.before)  # the next step trains
    rows = list(csv.DictReader((tmp_path / "run" / "logs" / "metrics.csv").read_text().splitlines()))
    assert [float(r["train/nonfinite_steps"]) for r in rows if r.get("train/nonfinite_steps")] == [0.0, 1.0, 1.0]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(ckpt["state_dict"]["nonfinite_steps"]) == 1
