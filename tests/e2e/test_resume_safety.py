"""Resuming reads run_dir/checkpoints/last.ckpt as data only: a file or an FSDP checkpoint directory
that would run code is refused with an error naming it, and the code never runs."""

import os

import pytest
import torch
from test_stage1_run import make_cfg  # tests/e2e/ is on sys.path under pytest (this file's folder)

from blip2_train.interop.state_dict import UnsafeCheckpointError


class RunsCode:
    """Unpickling this creates the directory ``marker``: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))



def _poisoned_run(tmp_path, marker):
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"global_step": 2, "epoch": 0, "state_dict": {}, "loops": {}, "payload": RunsCode(marker)}, last)
    return last


def test_a_code_running_last_ckpt_is_refused_by_the_resume_itself(tmp_path, cache, monkeypatch):
    from blip2_train.training import fit as train_module

    marker = tmp_path / "code_ran"
    last = _poisoned_run(tmp_path, marker)
    cfg = make_cfg(tmp_path, cache)
    with pytest.raises(UnsafeCheckpointError, match=f"refused to load {last}: .*GLOBAL os.makedirs"):
        train_module.train(cfg)
    assert not marker.exists()
    # Lightning's own load, without the step read before it: still refused, still nothing ran
    monkeypatch.setattr(train_module, "checkpoint_step", lambda path: 2)
    with pytest.raises(UnsafeCheckpointError, match=f"refused to load {last}"):
        train_module.train(cfg)
    assert not marker.exists()


def _sharded(directory, lr):
    """A sharded checkpoint as FSDP writes one: torch.distributed.checkpoint files plus meta.pt."""
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": {"w": torch.arange(6.0)}, "optimizer_0": {"param_groups": [{"lr": lr}]}}
    dcp.save(state, checkpoint_id=directory)
    torch.save({"global_step": 2, "epoch": 0}, directory / "meta.pt")
    return directory


def test_fsdp_checkpoint_directories_are_checked_entry_by_entry(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    from blip2_train.interop.state_dict import verify_sharded_checkpoint
    from blip2_train.training.fit import checkpoint_step
    from blip2_train.training.fsdp import FSDP2Strategy

    warnings.filterwarnings("ignore", message=".*(process group|no_dist).*")
    marker = tmp_path / "code_ran"
    good = _sharded(tmp_path / "good", 1e-4)
    verify_sharded_checkpoint(good)  # a genuine directory passes
    assert checkpoint_step(good) == 2
    bad = _sharded(tmp_path / "bad", RunsCode(marker))
    assert not marker.exists()
    shard = next(bad.glob("*.distcp"))
    for load in (lambda: FSDP2Strategy().load_checkpoint(bad), lambda: checkpoint_step(bad)):
        with pytest.raises(UnsafeCheckpointError, match=f"refused to load .*entry optimizer_0.*{shard}"):
            load()
        assert not marker.exists()
    # what would happen without the check: torch's reader unpickles the entry as code
    dcp.load({"optimizer_0": {"param_groups": [{"lr": 0.0}]}}, checkpoint_id=bad)
    assert marker.exists()
    os.rmdir(marker)

    # a .metadata that runs code (torch reads it with plain pickle.load)
    import pickle

    with open(good / ".metadata", "wb") as f:
        pickle.dump(RunsCode(marker), f)
    with pytest.raises(UnsafeCheckpointError, match=f"refused to load {good / '.metadata'}: .*os.makedirs"):
        FSDP2Strategy().load_checkpoint(good)
    assert not marker.exists()
    (good / "meta.pt").unlink()
    with pytest.raises(UnsafeCheckpointError, match=f"{good} is not a checkpoint.*lacks \\['meta.pt'\\]"):
        checkpoint_step(good)
