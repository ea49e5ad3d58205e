"""A SIGTERM that lands in validation: Lightning raises there, the checkpoint callback still saves and says so."""

import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from blip2_train.training.callbacks import AtomicLastCheckpoint


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:  # what Lightning's SIGTERM handler sets; its eval loop raises after this batch
            self.trainer._signal_connector.received_sigterm = True

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_sigterm_during_validation_saves_last_checkpoint_and_logs(tmp_path, caplog):
    data = DataLoader(TensorDataset(torch.randn(32, 4)), batch_size=4)
    callback = AtomicLastCheckpoint(tmp_path / "checkpoints", every_n_steps=100)
    trainer = L.Trainer(max_steps=20, val_check_interval=3, limit_val_batches=3, callbacks=[callback],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, accelerator="cpu", default_root_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="blip2_train.training.callbacks"), pytest.raises(SIGTERMException):
        trainer.fit(_Tiny(), data, data)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3  # the step validation ran after, not a periodic save (every 100)
    assert "stopping at step 3 after a signal" in caplog.text
