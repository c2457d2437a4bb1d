"""The finite-loss guard stops a fit at the first NaN loss, names the step, keeps the last good checkpoint."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.callbacks import FiniteLossGuard, NonFiniteLossError


class _NaNAt(LightningModule):
    """A linear regressor whose loss turns NaN at a chosen global step."""

    def __init__(self, nan_step: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.nan_step = nan_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.lin(x), y)
        if self.global_step >= self.nan_step:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer = Trainer(
        max_steps=10, callbacks=[FiniteLossGuard(), ckpt], logger=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )
    with pytest.raises(NonFiniteLossError, match="global step 5"):
        trainer.fit(_NaNAt(nan_step=5), DataLoader(data, batch_size=4))
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert state["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
