"""A run stopped at step S and resumed from its last.ckpt continues exactly as an uninterrupted run:
the same batches, the same next losses, and at the end the same weights, AdamW moments, scheduler
step and random states (CPU, fp32)."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from test_stage1_run import make_cfg  # tests/e2e/ is on sys.path under pytest (this file's folder)
from tiny_runs import train_with_callback

# 3 batches per epoch, so the runs cross epochs; validation every 3 steps
EXACT = ["trainer.max_steps=7", "data.samples_per_epoch=24", "trainer.val_check_interval=3",
         "checkpoint.every_n_steps=100"]


class Record(Callback):
    """The image ids and loss of every training step, and the stop at ``stop_at`` (as a signal would)."""

    def __init__(self, stop_at=None):
        self.stop_at, self.ids, self.losses = stop_at, {}, {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.ids[trainer.global_step + 1] = batch["image_id"].tolist()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])
        if trainer.global_step == self.stop_at:
            trainer.should_stop = True  # AtomicLastCheckpoint writes last.ckpt at this step





@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    record = Record()
    train_with_callback(make_cfg(tmp, cache, *EXACT), record)
    run = tmp / "run"
    return {"losses": record.losses, "ids": record.ids,
            "ckpt": torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)}


def _assert_same_state(resumed, reference):
    """Equal up to CPU run-to-run noise: two uninterrupted runs of this config already differ by up to
    2e-7 in weights and AdamW moments (measured; threaded reductions in backward), which AdamW
    magnifies on parameters whose true gradient is zero (cross-attention key biases)."""
    assert resumed["global_step"] == reference["global_step"] == 7
    for name, value in reference["state_dict"].items():
        assert torch.allclose(resumed["state_dict"][name], value, rtol=0, atol=2e-6), name
    (opt,), (ref_opt,) = resumed["optimizer_states"], reference["optimizer_states"]
    assert len(ref_opt["state"]) > 40
    for key in ("exp_avg", "exp_avg_sq"):
        scale = max(state[key].abs().max().item() for state in ref_opt["state"].values())
        for index, state in ref_opt["state"].items():
            assert torch.equal(opt["state"][index]["step"], state["step"])
            diff = (opt["state"][index][key] - state[key]).abs().max().item()
            assert diff <= 1e-4 * scale, (index, key, diff, scale)
    assert resumed["lr_schedulers"][0]["last_epoch"] == reference["lr_schedulers"][0]["last_epoch"] == 7
    (rng,), (ref_rng,) = resumed["callbacks"]["ResumeRNG"]["rng_states"], reference["callbacks"]["ResumeRNG"]["rng_states"]
    assert torch.equal(rng["torch"], ref_rng["torch"]) and rng["python"] == ref_rng["python"]


@pytest.mark.parametrize("stop_at", [3, 4])  # at an epoch's end (and a validation), in the middle of one
def test_a_resumed_run_continues_exactly_as_an_uninterrupted_one(tmp_path, cache, uninterrupted, stop_at):
    cfg = make_cfg(tmp_path, cache, *EXACT)
    first = Record(stop_at)
    train_with_callback(cfg, first)
    run = tmp_path / "run"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == stop_at
    second = Record()
    metrics = train_with_callback(cfg, second)
    assert metrics["resumed_from_step"] == stop_at and metrics["global_step"] == 7
    ids = {**first.ids, **second.ids}
    assert sorted(second.ids) == list(range(stop_at + 1, 8))
    assert ids == uninterrupted["ids"]  # the same batches, in the same order (data position)
    print("resumed", second.losses, "uninterrupted", uninterrupted["losses"])
    assert sorted(second.losses) == list(range(stop_at + 1, 8))
    for step, loss in second.losses.items():
        assert loss == pytest.approx(uninterrupted["losses"][step], abs=1e-6), step
    _assert_same_state(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True), uninterrupted["ckpt"])
