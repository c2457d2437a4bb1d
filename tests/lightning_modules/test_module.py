"""ScoreModel: training with EMA, checkpoint round trip, EMA-weighted validation, pretrained import, YAML."""

import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import slice_sample
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, Dataset

from datamodules.samples import SliceSample
from lightning_modules.checkpoint import load_score_sde_checkpoint
from lightning_modules.losses import dsm_loss
from lightning_modules.module import ScoreModel
from lightning_modules.networks.ddpm import DDPMConfig
from lightning_modules.sampling.sde import get_score_fn

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "score_sde_tiny"  # copy of shared/fixtures
TINY = dict(net=DDPMConfig(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16,
                           num_groups=8))
FIXTURE_NET = dict(net=DDPMConfig(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                                  image_size=16))


pytestmark = pytest.mark.usefixtures("one_thread")


class Slices(Dataset):
    """`SliceSample`s like the data module's: clean / degraded [2, H, W] (16 x 16 unless given) plus metadata
    (`helpers.slice_sample`)."""

    def __init__(self, shape: tuple[int, int] = (16, 16)) -> None:
        self.shape = shape

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> SliceSample:
        g = torch.Generator().manual_seed(i)
        clean = torch.randn(2, *self.shape, generator=g)
        return slice_sample(clean, clean + 0.3 * torch.randn(2, *self.shape, generator=g), i)


def loader(shape: tuple[int, int] = (16, 16)) -> DataLoader:
    return DataLoader(Slices(shape), batch_size=4)


def trainer(tmp_path: Path, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                num_sanity_val_steps=0)
    return pl.Trainer(**{**args, **kw})


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    model = ScoreModel(**TINY, supervised_weight=0.5, lr=1e-3, warmup_steps=2, ema_decay=0.99)
    tr = trainer(tmp, max_steps=3, limit_val_batches=1)
    tr.fit(model, loader(), loader())
    path = tmp / "tiny.ckpt"
    tr.save_checkpoint(path)
    return model, tr, path


def test_training_logs_terms_and_updates_ema(trained):
    model, tr, _ = trained
    for key in ("train/dsm", "train/supervised", "train/loss", "val/dsm", "val/supervised", "val/loss"):
        assert key in tr.callback_metrics, key
    assert model.ema.num_updates == 3
    pairs = zip(model.ema.shadow_params, model.net.parameters(), strict=True)
    assert not all(torch.equal(s, p) for s, p in pairs)


def test_lightning_checkpoint_round_trip_keeps_ema(trained):
    model, _, path = trained
    loaded = ScoreModel.load_from_checkpoint(path, map_location="cpu")
    assert loaded.ema.num_updates == model.ema.num_updates and loaded.ema.decay == model.ema.decay
    for a, b in zip(loaded.ema.shadow_params, model.ema.shadow_params, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(loaded.net.parameters(), model.net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_validation_uses_ema_weights_is_deterministic_and_restores(trained, tmp_path):
    model, _, _ = trained
    before = params(model.net)
    tr = trainer(tmp_path)
    first = tr.validate(model, loader(), verbose=False)[0]
    second = tr.validate(model, loader(), verbose=False)[0]
    assert first == second
    for a, b in zip(before, model.net.parameters(), strict=True):
        assert torch.equal(a, b)  # training weights restored after validation
    # the logged value is the EMA network's loss with the per-batch seeded generator
    ema_net = model.frozen_net(use_ema=True)
    batch = next(iter(loader()))
    dsm0 = dsm_loss(ema_net, model.sde, batch.clean, generator=torch.Generator().manual_seed(0))
    raw = dsm_loss(model.net.eval(), model.sde, batch.clean, generator=torch.Generator().manual_seed(0))
    batches = list(loader())
    expected = sum(dsm_loss(ema_net, model.sde, b.clean, generator=torch.Generator().manual_seed(i)).item()
                   for i, b in enumerate(batches)) / len(batches)
    assert first["val/dsm"] == pytest.approx(expected, rel=1e-5)
    assert abs(raw.item() - dsm0.item()) > 1e-6  # EMA and raw weights give different losses


def test_score_fn_uses_a_frozen_ema_copy(trained):
    model, _, _ = trained
    score_fn = model.score_fn()
    ema_net = model.frozen_net(use_ema=True)
    x, t = torch.randn(2, 2, 16, 16), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        torch.testing.assert_close(score_fn(x, t), get_score_fn(ema_net, model.sde)(x, t))
    assert not any(p.requires_grad for p in ema_net.parameters()) and not ema_net.training


def test_score_fn_and_forward_run_at_a_native_size_that_is_not_a_multiple(trained):
    model, _, _ = trained
    assert model.net.size_multiple == 2
    x, t = torch.randn(2, 2, 15, 13), torch.tensor([0.2, 0.7])
    ema_net = model.frozen_net(use_ema=True)
    padded = F.pad(F.pad(x, (0, 1, 0, 0), mode="reflect"), (0, 0, 0, 1), mode="reflect")  # 16 x 14
    with torch.no_grad():
        expected = model.sde.score_from_output(ema_net.unet(padded, model.sde.labels(t))[..., :15, :13], t)
        torch.testing.assert_close(model.score_fn()(x, t), expected, rtol=0, atol=0)
        assert model(x, t).shape == x.shape


def test_validation_losses_on_whole_slices_of_a_non_multiple_shape(trained, tmp_path):
    model, _, _ = trained
    metrics = trainer(tmp_path).validate(model, loader((15, 13)), verbose=False)[0]
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("val/dsm", "val/supervised", "val/loss"))


def test_warmup_schedule_and_ema_once_per_optimiser_step(tmp_path):
    model = ScoreModel(**TINY, lr=1e-3, warmup_steps=4, ema_decay=0.9)
    tr = trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, limit_val_batches=0)
    tr.fit(model, loader())
    assert model.ema.num_updates == 2
    opt = tr.optimizers[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 3 / 4)  # after 2 steps: factor (2 + 1) / 4
    assert isinstance(opt, torch.optim.AdamW)


def test_supervised_term_is_skipped_in_training_when_its_weight_is_zero(tmp_path):
    model = ScoreModel(**TINY, supervised_weight=0.0)
    tr = trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    tr.fit(model, loader(), loader())
    assert "train/supervised" not in tr.callback_metrics and "val/supervised" in tr.callback_metrics


def test_pretrained_score_sde_weights_are_loaded_when_fit_starts(tmp_path):
    pretrained = tmp_path / "clinical.pth"
    shutil.copy(FIXTURE / "checkpoint.pth", pretrained)
    model = ScoreModel(**FIXTURE_NET, pretrained=str(pretrained),
                       pretrained_config=str(FIXTURE / "config.json"), warmup_steps=1)
    model.on_fit_start()
    ref = load_score_sde_checkpoint(FIXTURE / "checkpoint.pth", FIXTURE / "config.json", weights="ema")
    for a, b, s in zip(model.net.parameters(), ref.parameters(), model.ema.shadow_params, strict=True):
        assert torch.equal(a, b) and torch.equal(s, b)
    # fine-tune, save; the checkpoint then never needs the clinical file again
    tr = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    tr.fit(model, loader())
    tr.save_checkpoint(tmp_path / "ft.ckpt")
    pretrained.unlink()
    loaded = ScoreModel.load_from_checkpoint(tmp_path / "ft.ckpt", map_location="cpu")
    trainer(tmp_path, limit_val_batches=1).validate(loaded, loader(), verbose=False)
    for a, b in zip(loaded.net.parameters(), model.net.parameters(), strict=True):
        assert torch.equal(a, b)
    # resuming the fine-tune (same config, clinical file gone) restores the run's own weights and EMA
    resumed = ScoreModel(**FIXTURE_NET, pretrained=str(pretrained),
                         pretrained_config=str(FIXTURE / "config.json"), warmup_steps=1)
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(resumed, loader(), ckpt_path=tmp_path / "ft.ckpt")
    assert resumed.ema.num_updates == 2


def test_pretrained_that_does_not_fit_is_one_clear_error():
    model = ScoreModel(**TINY, pretrained=str(FIXTURE / "checkpoint.pth"))  # own (tiny) config: nf 16 != 32
    with pytest.raises(ValueError, match=r"checkpoint.pth: checkpoint does not fit the DDPM config"):
        model.on_fit_start()
    model = ScoreModel(**TINY, pretrained=str(FIXTURE / "checkpoint.pth"),
                       pretrained_config=str(FIXTURE / "config.json"))
    with pytest.raises(ValueError, match=r"differs from this model's: nf=32 \(this model 16\)"):
        model.on_fit_start()


def test_yaml_model_block_through_lightning_cli(tmp_path):
    config = {"model": {"class_path": "lightning_modules.module.ScoreModel",
                        "init_args": {"net": TINY["net"].to_dict(),
                                      "supervised_weight": 0.5, "supervised_t0": [0.1, 0.2],
                                      "supervised_loss": "l2", "ema_decay": 0.999}},
              "trainer": {"accelerator": "cpu", "logger": False}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(LightningModule, subclass_mode_model=True, run=False,
                       args=["--config", str(path), "--model.init_args.lr=5e-4",
                             "--model.init_args.pretrained_weights=model"])
    model = cli.model
    assert isinstance(model, ScoreModel) and model.net.nf == 16
    assert model.hparams.lr == 5e-4 and model.hparams.pretrained_weights == "model"
    assert tuple(model.hparams.supervised_t0) == (0.1, 0.2) and model.ema.decay == 0.999


def test_bf16_mixed_training_and_grad_checkpointing(tmp_path):
    model = ScoreModel(**TINY, supervised_weight=1.0, grad_checkpointing=True, warmup_steps=1)
    tr = trainer(tmp_path, max_steps=2, limit_val_batches=0, precision="bf16-mixed")
    tr.fit(model, loader())
    assert model.net.grad_checkpointing and torch.isfinite(tr.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 for p in model.net.parameters())
    assert all(s.dtype == torch.float32 for s in model.ema.shadow_params)
