"""ScoreModel: training with EMA, checkpoint round trip, EMA-weighted validation, pretrained import, YAML."""

import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import slice_sample
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, Dataset, default_collate

from datamodules.samples import SliceSample
from diffusion.checkpoint import load_score_sde_checkpoint
from diffusion.losses import dsm_loss, supervised_loss
from diffusion.networks.ddpm import DDPMConfig
from diffusion.sampling.sde import get_score_fn
from lightning_modules.module import LossConfig, OptimConfig, ScoreModel
from lightning_modules.priors import PretrainedSource

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
    model = ScoreModel(**TINY, loss=LossConfig(supervised_weight=0.5),
                       optim=OptimConfig(lr=1e-3, warmup_steps=2, ema_decay=0.99))
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
    # by hand: the EMA network on the whole 15 x 13 slices, DSM then the supervised term on the generator of
    # batch i (val_seed + i), the loss weighted as in training (dsm 1, supervised 0.5)
    ema_net, dsm, sup = model.frozen_net(use_ema=True), [], []
    for i, b in enumerate(loader((15, 13))):
        g = torch.Generator().manual_seed(model.hparams.val_seed + i)
        dsm.append(dsm_loss(ema_net, model.sde, b.clean, generator=g).item())
        sup.append(supervised_loss(ema_net, model.sde, b.degraded, b.clean, generator=g).item())
    expected = {"val/dsm": np.mean(dsm), "val/supervised": np.mean(sup)}
    expected["val/loss"] = expected["val/dsm"] + 0.5 * expected["val/supervised"]
    assert metrics == pytest.approx(expected, rel=1e-5)


def test_warmup_schedule_and_ema_once_per_optimiser_step(tmp_path):
    model = ScoreModel(**TINY, optim=OptimConfig(lr=1e-3, warmup_steps=4, ema_decay=0.9))
    tr = trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, limit_val_batches=0)
    tr.fit(model, loader())
    assert model.ema.num_updates == 2
    opt = tr.optimizers[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 3 / 4)  # after 2 steps: factor (2 + 1) / 4
    assert isinstance(opt, torch.optim.AdamW)


def test_supervised_term_is_skipped_in_training_when_its_weight_is_zero(tmp_path):
    model = ScoreModel(**TINY, loss=LossConfig(supervised_weight=0.0))
    tr = trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    tr.fit(model, loader(), loader())
    assert "train/supervised" not in tr.callback_metrics and "val/supervised" in tr.callback_metrics


def test_pretrained_score_sde_weights_are_loaded_when_fit_starts(tmp_path):
    pretrained = tmp_path / "clinical.pth"
    shutil.copy(FIXTURE / "checkpoint.pth", pretrained)
    source = PretrainedSource(path=str(pretrained), config=str(FIXTURE / "config.json"))
    model = ScoreModel(**FIXTURE_NET, pretrained=source, optim=OptimConfig(warmup_steps=1))
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
    resumed = ScoreModel(**FIXTURE_NET, pretrained=source, optim=OptimConfig(warmup_steps=1))
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(resumed, loader(), ckpt_path=tmp_path / "ft.ckpt")
    assert resumed.ema.num_updates == 2


def test_pretrained_that_does_not_fit_is_one_clear_error():
    # its own (tiny) config: nf 16 != 32
    model = ScoreModel(**TINY, pretrained=PretrainedSource(str(FIXTURE / "checkpoint.pth")))
    with pytest.raises(ValueError, match=r"checkpoint.pth: checkpoint does not fit the DDPM config"):
        model.on_fit_start()
    model = ScoreModel(**TINY, pretrained=PretrainedSource(str(FIXTURE / "checkpoint.pth"),
                                                           config=str(FIXTURE / "config.json")))
    with pytest.raises(ValueError, match=r"differs from this model's: nf=32 \(this model 16\)"):
        model.on_fit_start()


def test_yaml_model_block_through_lightning_cli(tmp_path):
    config = {"model": {"class_path": "lightning_modules.module.ScoreModel",
                        "init_args": {"net": TINY["net"].to_dict(),
                                      "loss": {"supervised_weight": 0.5, "supervised_t0": [0.1, 0.2],
                                               "supervised_loss": "l2"},
                                      "optim": {"ema_decay": 0.999}}},
              "trainer": {"accelerator": "cpu", "logger": False}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(LightningModule, subclass_mode_model=True, run=False,
                       args=["--config", str(path), "--model.init_args.optim.lr=5e-4",
                             "--model.init_args.pretrained.weights=model"])
    model = cli.model
    assert isinstance(model, ScoreModel) and model.net.nf == 16
    assert model.optim_config == OptimConfig(lr=5e-4, ema_decay=0.999) and model.ema.decay == 0.999
    assert model.loss_config == LossConfig(supervised_weight=0.5, supervised_t0=(0.1, 0.2),
                                           supervised_loss="l2")
    assert model.hparams.pretrained["weights"] == "model" and model.hparams.optim["lr"] == 5e-4
    assert model.hparams.loss["supervised_t0"] == [0.1, 0.2]  # plain values: hparams.yaml, the loggers


def test_bf16_mixed_training_and_grad_checkpointing(tmp_path):
    model = ScoreModel(**TINY, loss=LossConfig(supervised_weight=1.0), optim=OptimConfig(warmup_steps=1),
                       grad_checkpointing=True)
    tr = trainer(tmp_path, max_steps=2, limit_val_batches=0, precision="bf16-mixed")
    tr.fit(model, loader())
    assert model.net.grad_checkpointing and torch.isfinite(tr.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 for p in model.net.parameters())
    assert all(s.dtype == torch.float32 for s in model.ema.shadow_params)


# ------------------------------------------------------------------ losses that can fail for the right reason
class GaussianPrior(torch.nn.Module):
    """The exact noise prediction of data N(mu, s^2) per pixel under a VP-SDE, called as the DDPM is
    (`net(x_t, 999 t)`): the marginal is N(alpha mu, alpha^2 s^2 + std^2), its score
    -(x_t - alpha mu) / (alpha^2 s^2 + std^2) and the prediction -std * score. `s = 0` with `mu` an image:
    the point mass at that image, whose score makes the DSM loss exactly zero."""

    def __init__(self, sde, mu: torch.Tensor | float, s: float) -> None:
        super().__init__()
        self.sde, self.mu, self.s = sde, mu, s

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = labels / 999.0
        a, std = self.sde.alpha(t)[:, None, None, None], self.sde.std(t)[:, None, None, None]
        return std * (x - a * self.mu) / (a**2 * self.s**2 + std**2)


class Restorer(torch.nn.Module):
    """A supervised-term oracle: at (x_t0, 999 t0) it returns what makes the one-step Tweedie estimate exactly
    `target` ((x_t0 - alpha target) / std), plus `error` (a constant) when asked for a wrong answer."""

    def __init__(self, sde, target: torch.Tensor, error: float = 0.0) -> None:
        super().__init__()
        self.sde, self.target, self.error = sde, target, error

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = labels / 999.0
        a, std = self.sde.alpha(t)[:, None, None, None], self.sde.std(t)[:, None, None, None]
        return (x - a * self.target) / std + self.error


def _dsm_times(batch: int, seed: int) -> torch.Tensor:
    """The times DSM draws first from a generator seeded `seed` (t ~ U(1e-5, 1))."""
    return torch.rand(batch, generator=torch.Generator().manual_seed(seed)) * (1 - 1e-5) + 1e-5


def _batch(clean: torch.Tensor, degraded: torch.Tensor | None = None) -> SliceSample:
    degraded = clean if degraded is None else degraded
    pairs = zip(clean, degraded, strict=True)
    return default_collate([slice_sample(c, d, i) for i, (c, d) in enumerate(pairs)])


def test_the_dsm_term_is_zero_for_the_true_score_and_the_noise_power_for_a_zero_score():
    model = ScoreModel(**TINY, loss=LossConfig(dsm_weight=1.0, supervised_weight=0.0))
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 2, 32, 32, generator=g)
    point = _batch(image.expand(8, -1, -1, -1).clone(), torch.randn(8, 2, 32, 32, generator=g))
    model.net = GaussianPrior(model.sde, image, 0.0)  # the training data's own score: a point mass at `image`
    assert model._losses(point, torch.Generator().manual_seed(1), compute_all=False)["loss"] < 1e-8
    # the score of another image is not the data's: the loss (of the clean batch, not the degraded) is large
    model.net = GaussianPrior(model.sde, torch.zeros_like(image), 0.0)
    assert model._losses(point, torch.Generator().manual_seed(1), compute_all=False)["loss"] > 0.5
    # data N(0.5, 1.5^2): the true score's loss is E_t[alpha^2 s^2 / (alpha^2 s^2 + std^2)], a zero score's 1
    mu, s = 0.5, 1.5
    gauss = _batch(mu + s * torch.randn(8, 2, 32, 32, generator=g))
    model.net = GaussianPrior(model.sde, mu, s)
    t = _dsm_times(8, 2)
    a2 = model.sde.alpha(t) ** 2
    expected = (a2 * s**2 / (a2 * s**2 + model.sde.std(t) ** 2)).mean()
    loss = model._losses(gauss, torch.Generator().manual_seed(2), compute_all=False)["loss"]
    assert loss.item() == pytest.approx(expected.item(), rel=0.05) and expected < 0.8
    model.net = GaussianPrior(model.sde, 0.0, 0.0)
    model.net.forward = lambda x, labels: torch.zeros_like(x)
    zero = model._losses(gauss, torch.Generator().manual_seed(2), compute_all=False)["loss"]
    assert zero.item() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_the_supervised_term_is_zero_when_the_network_restores_the_clean_slice(kind):
    model = ScoreModel(**TINY, loss=LossConfig(dsm_weight=0.0, supervised_weight=1.0, supervised_loss=kind))
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(4, 2, 16, 16, generator=g)
    batch = _batch(clean, clean + 0.3 * torch.randn(4, 2, 16, 16, generator=g))
    model.net = Restorer(model.sde, clean)
    assert model._losses(batch, torch.Generator().manual_seed(1), compute_all=False)["loss"] < 1e-6  # float32
    # restoring the degraded slice instead (the term compares with the clean one) is the degradation error
    model.net = Restorer(model.sde, batch.degraded)
    error = model._losses(batch, torch.Generator().manual_seed(1), compute_all=False)["loss"]
    diff = batch.degraded - clean
    torch.testing.assert_close(error, diff.abs().mean() if kind == "l1" else diff.square().mean())
    # an output off by a constant e: x0_hat is off by -std(t0) e / alpha(t0), at the t0 drawn first
    model.net = Restorer(model.sde, clean, error=0.1)
    off = model._losses(batch, torch.Generator().manual_seed(1), compute_all=False)["loss"]
    t0 = torch.rand(4, generator=torch.Generator().manual_seed(1)) * 0.25 + 0.05  # supervised_t0 (0.05, 0.3)
    ratio = model.sde.std(t0) / model.sde.alpha(t0)
    expected = (0.1 * ratio).mean() if kind == "l1" else (0.01 * ratio**2).mean()
    torch.testing.assert_close(off, expected, rtol=1e-4, atol=0)


def test_the_loss_weights_scale_their_terms():
    batch = next(iter(loader()))

    def losses(dsm_weight: float, supervised_weight: float, compute_all: bool = False) -> dict:
        torch.manual_seed(0)  # one network for every weighting
        model = ScoreModel(**TINY, loss=LossConfig(dsm_weight, supervised_weight))
        return model._losses(batch, torch.Generator().manual_seed(3), compute_all=compute_all)

    one_dsm, one_sup = losses(1.0, 0.0)["loss"], losses(0.0, 1.0)["loss"]
    torch.testing.assert_close(losses(2.5, 0.0)["loss"], 2.5 * one_dsm)
    torch.testing.assert_close(losses(0.0, 3.0)["loss"], 3.0 * one_sup)
    both = losses(2.5, 3.0)
    torch.testing.assert_close(both["loss"], 2.5 * both["dsm"] + 3.0 * both["supervised"])
    assert torch.equal(both["dsm"], one_dsm)  # DSM draws first: the same noise with either weighting
    assert "supervised" not in losses(1.0, 0.0) and "dsm" not in losses(0.0, 1.0)  # weight 0: not computed
    evaluated = losses(1.0, 0.0, compute_all=True)  # validation: both terms, the loss still weighted
    torch.testing.assert_close(evaluated["loss"], evaluated["dsm"])


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a training step without a Trainer
@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0)])
def test_the_training_loss_trains_the_network_and_nothing_else(weights):
    torch.manual_seed(0)
    model = ScoreModel(**TINY, loss=LossConfig(dsm_weight=weights[0], supervised_weight=weights[1]))
    assert {id(p) for p in model.parameters()} == {id(p) for p in model.net.parameters()}
    batch = next(iter(loader()))
    batch = batch._replace(clean=batch.clean.requires_grad_(), degraded=batch.degraded.requires_grad_())
    model.training_step(batch, 0).backward()
    grads = {name: p.grad for name, p in model.net.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    # every layer learns: the output conv, and every block whose output the zero-initialised convs do not mute
    nonzero = {n for n, g in grads.items() if g.abs().sum() > 0}
    assert len(nonzero) >= 0.5 * len(grads) and any("all_modules.0." in n for n in nonzero), sorted(nonzero)
    assert all(s.grad is None and not s.requires_grad for s in model.ema.shadow_params)  # EMA: not trained
    # the batch is data, not a parameter: the loss's gradient reaches it only through the network
    assert batch.clean.grad is not None if weights[0] else batch.degraded.grad is not None
