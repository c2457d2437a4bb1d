"""The supervised term's conditioning (`ScoreModel`'s `loss.supervised_conditioning`,
`supervised_loss(label_offset=...)`): 'shared' is today's loss bit for bit; 'separate' calls the DDPM with
labels sde.labels(t0) + 1000, which the score (DSM, sampling) never uses; a checkpoint family refuses it;
checkpoints without the option load as 'shared'; DSM-only training (supervised_weight 0) is configured from
YAML / the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import QUICKSTART, SCORE_SDE_CKPT, SCORE_SDE_FIXTURE, slice_sample
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI

from datamodules.samples import SliceSample
from diffusion.losses import SUPERVISED_LABEL_OFFSET, dsm_loss, supervised_loss
from diffusion.networks.ddpm import DDPM, DDPMConfig
from diffusion.sampling.sde import VPSDE, get_score_fn
from lfmri_utils.errors import InputError
from lightning_modules.ema import EMA
from lightning_modules.module import LossConfig, OptimConfig, ScoreModel, upgrade_hparams
from lightning_modules.priors import PretrainedSource

pytestmark = pytest.mark.usefixtures("one_thread")

NET = DDPMConfig(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), image_size=16, num_groups=4,
                 dropout=0.0)
SDE = VPSDE()


class Recording(torch.nn.Module):
    """`net` that records the labels of every call."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.labels = net, []

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.labels.append(labels.detach().clone())
        return self.net(x, labels)


def perturb(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """`net` with every parameter moved by N(0, 0.05^2) noise: score_sde's initialisation zeroes the output
    layer, where the output would not depend on the labels at all."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


def tiny_net(seed: int = 0) -> DDPM:
    torch.manual_seed(seed)
    return perturb(DDPM(NET), seed)


def data(seed: int = 1, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(n, 2, 16, 16, generator=g)
    return clean + 0.3 * torch.randn(clean.shape, generator=g), clean


def batch(n: int = 2) -> SliceSample:
    degraded, clean = data(7, n)
    samples = [slice_sample(clean[i], degraded[i], i) for i in range(n)]
    return SliceSample(clean=clean, degraded=degraded, y=torch.stack([s.y for s in samples]),
                       regime=["noise"] * n,
                       params={k: torch.stack([s.params[k] for s in samples]) for k in samples[0].params},
                       volume_id=[s.volume_id for s in samples], slice=torch.arange(n),
                       scale=torch.ones(n))


def by_hand(net: torch.nn.Module, degraded: torch.Tensor, clean: torch.Tensor, seed: int, t0_range, kind: str,
            offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The supervised loss written out (the operations of today's loss, in its order, so 'shared' is
    bit-identical): t0 ~ U(t0_range), z ~ N(0, I) from `seed` (in that order), the DDPM called at labels
    999 t0 (+ offset when it is not 0), Tweedie at t0. Returns (loss, labels)."""
    g = torch.Generator().manual_seed(seed)
    low, high = t0_range
    t0 = torch.rand(degraded.shape[0], generator=g) * (high - low) + low
    z = torch.randn(degraded.shape, generator=g)
    a, s = SDE.alpha(t0)[:, None, None, None], SDE.std(t0)[:, None, None, None]
    labels = 999.0 * t0
    if offset:
        labels = labels + offset
    x_t0 = a * degraded + s * z
    x0_hat = (x_t0 - s * net(x_t0, labels)) / a
    diff = x0_hat - clean
    return (diff.abs().mean() if kind == "l1" else diff.square().mean()), labels


# ------------------------------------------------------------------------------------------- the loss
def test_the_offset_is_past_the_scores_label_range():
    assert SUPERVISED_LABEL_OFFSET == 1000.0
    assert SDE.labels(torch.tensor([1.0])).item() < SUPERVISED_LABEL_OFFSET  # the score's labels: <= 999


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_shared_is_todays_loss_bit_for_bit(kind):
    net = tiny_net()
    degraded, clean = data()
    today = supervised_loss(net, SDE, degraded, clean, loss=kind, generator=torch.Generator().manual_seed(3))
    shared = supervised_loss(net, SDE, degraded, clean, loss=kind, generator=torch.Generator().manual_seed(3),
                             label_offset=0.0)
    assert torch.equal(today, shared)
    expected, _ = by_hand(net, degraded, clean, 3, (0.05, 0.3), kind, 0.0)
    assert torch.equal(shared, expected)


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_separate_calls_the_net_past_the_score_labels_and_matches_a_hand_computation(kind):
    rec = Recording(tiny_net())
    degraded, clean = data()
    loss = supervised_loss(rec, SDE, degraded, clean, t0_range=(0.05, 0.3), loss=kind,
                           generator=torch.Generator().manual_seed(3), label_offset=SUPERVISED_LABEL_OFFSET)
    (labels,) = rec.labels
    expected, hand_labels = by_hand(rec.net, degraded, clean, 3, (0.05, 0.3), kind, 1000.0)
    assert (labels >= 1000).all() and (labels <= 1000 + 999 * 0.3 + 1e-3).all()
    assert torch.equal(labels, hand_labels) and torch.equal(loss, expected)
    shared = supervised_loss(rec.net, SDE, degraded, clean, loss=kind,
                             generator=torch.Generator().manual_seed(3))
    assert abs(loss.item() - shared.item()) > 1e-6  # another conditioning, another output


def test_separate_gradients_reach_every_parameter():
    net = tiny_net()
    degraded, clean = data()
    loss = supervised_loss(net, SDE, degraded, clean, generator=torch.Generator().manual_seed(3),
                           label_offset=SUPERVISED_LABEL_OFFSET)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    temb = [p.grad for name, p in net.named_parameters() if name.startswith("all_modules.0.")]
    assert temb and any(g.abs().sum() > 0 for g in temb)  # the time embedding MLP learns the new labels


def test_a_label_offset_with_a_score_fn_is_refused():
    x = torch.randn(2, 2, 8, 8)
    score_fn = get_score_fn(tiny_net(), SDE)
    with pytest.raises(ValueError, match="label_offset"):
        supervised_loss(None, SDE, x, x, score_fn=score_fn, label_offset=SUPERVISED_LABEL_OFFSET)
    supervised_loss(None, SDE, x, x, score_fn=score_fn, label_offset=0.0)  # the default stays allowed


# ------------------------------------------------------------------------------------------- the module
def model(conditioning: str | None, seed: int = 0, **optim) -> ScoreModel:
    """A tiny model with the supervised term (weight 1) in `conditioning` (None: the default), `optim`
    (`OptimConfig` fields; default warmup_steps 1) and perturbed weights."""
    torch.manual_seed(seed)
    loss = LossConfig(supervised_weight=1.0)
    if conditioning is not None:
        loss = LossConfig(supervised_weight=1.0, supervised_conditioning=conditioning)
    m = ScoreModel(net=NET, loss=loss, optim=OptimConfig(**{"warmup_steps": 1, **optim}))
    perturb(m.net, seed)
    m.ema = EMA(m.net.parameters(), decay=m.optim_config.ema_decay)  # it starts from the perturbed weights
    return m


def test_module_default_is_shared_and_gives_todays_losses():
    default, shared = model(None), model("shared")
    assert default.hparams.loss["supervised_conditioning"] == "shared"
    assert default.supervised_label_offset == 0.0
    b = batch()
    a = default._losses(b, torch.Generator().manual_seed(5), compute_all=True)
    c = shared._losses(b, torch.Generator().manual_seed(5), compute_all=True)
    for k in ("dsm", "supervised", "loss"):
        assert torch.equal(a[k], c[k]), k
    # today's composition: DSM, then the supervised loss, on one generator
    g = torch.Generator().manual_seed(5)
    dsm = dsm_loss(default.net, default.sde, b.clean, generator=g)
    sup = supervised_loss(default.net, default.sde, b.degraded, b.clean, generator=g)
    assert torch.equal(a["dsm"], dsm) and torch.equal(a["supervised"], sup)
    assert torch.equal(a["loss"], dsm + sup)


def test_module_separate_losses_on_a_slice_batch():
    m = model("separate")
    assert m.hparams.loss["supervised_conditioning"] == "separate" and m.supervised_label_offset == 1000.0
    m.net = Recording(m.net)
    b = batch()
    out = m._losses(b, torch.Generator().manual_seed(5), compute_all=False)
    dsm_labels, sup_labels = m.net.labels
    assert (dsm_labels < 1000).all() and (sup_labels >= 1000).all()
    # by hand: the same generator, DSM first, then the supervised term at labels 999 t0 + 1000
    g = torch.Generator().manual_seed(5)
    dsm = dsm_loss(m.net.net, m.sde, b.clean, generator=g)
    sup = supervised_loss(m.net.net, m.sde, b.degraded, b.clean, generator=g, label_offset=1000.0)
    assert torch.equal(out["dsm"], dsm) and torch.equal(out["supervised"], sup)
    torch.testing.assert_close(out["loss"], dsm + sup)
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.net.parameters())


def test_the_option_leaves_dsm_and_the_score_unchanged():
    shared, separate = model("shared"), model("separate")
    b = batch()
    a = shared._losses(b, torch.Generator().manual_seed(9), compute_all=True)
    c = separate._losses(b, torch.Generator().manual_seed(9), compute_all=True)
    assert torch.equal(a["dsm"], c["dsm"])
    assert not torch.equal(a["supervised"], c["supervised"])
    x, t = torch.randn(2, 2, 16, 16), torch.tensor([0.02, 0.6])
    with torch.no_grad():
        assert torch.equal(shared.score_fn()(x, t), separate.score_fn()(x, t))
        assert torch.equal(shared(x, t), separate(x, t))


def test_a_short_fit_with_separate_conditioning(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    data_ = [slice_sample(c, d, i) for i, (d, c) in enumerate(zip(*data(11, 4), strict=True))]
    m = model("separate", lr=1e-3, ema_decay=0.9)
    tr = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                    num_sanity_val_steps=0, max_steps=2, limit_val_batches=1)
    tr.fit(m, DataLoader(data_, batch_size=2), DataLoader(data_, batch_size=2))
    for k in ("train/supervised", "val/supervised", "val/dsm", "train/loss"):
        assert torch.isfinite(tr.callback_metrics[k]), k
    tr.save_checkpoint(tmp_path / "separate.ckpt")
    loaded = ScoreModel.load_from_checkpoint(tmp_path / "separate.ckpt", map_location="cpu")
    assert loaded.loss_config.supervised_conditioning == "separate"
    assert loaded.supervised_label_offset == 1000.0


# --------------------------------------------------------------------------------------------- refusals
def test_a_family_refuses_separate_conditioning():
    family = PretrainedSource(str(SCORE_SDE_CKPT), config=str(SCORE_SDE_FIXTURE / "config.json"),
                              family="score_sde")
    separate = LossConfig(supervised_conditioning="separate")
    with pytest.raises(InputError, match=r"^loss.supervised_conditioning 'separate' .*=score_sde"):
        ScoreModel(pretrained=family, loss=separate)
    # refused before the family's config is looked for
    with pytest.raises(InputError, match=r"^loss.supervised_conditioning 'separate'"):
        ScoreModel(pretrained=PretrainedSource(family="dds"), loss=separate)
    # 'shared' with the same family builds
    ScoreModel(pretrained=family, loss=LossConfig(supervised_conditioning="shared"))


def test_a_detected_family_refuses_separate_conditioning():
    from helpers import FAMILY_CHECKPOINTS

    with pytest.raises(InputError, match=r"^loss.supervised_conditioning 'separate' .*family=hfs_sde"):
        ScoreModel(pretrained=PretrainedSource(str(FAMILY_CHECKPOINTS["hfs_sde"])),
                   loss=LossConfig(supervised_conditioning="separate"))


@pytest.mark.parametrize(("field", "words"), [({"conditional": False}, "net.conditional: false"),
                                              ({"scale_by_sigma": True}, "net.scale_by_sigma: true")])
def test_a_ddpm_without_plain_time_labels_refuses_separate(field, words):
    net = DDPMConfig(**{**NET.to_dict(), **field})
    with pytest.raises(InputError, match=words):
        ScoreModel(net=net, loss=LossConfig(supervised_conditioning="separate"))
    ScoreModel(net=net, loss=LossConfig(supervised_conditioning="shared"))


def test_an_unknown_conditioning_is_one_line():
    with pytest.raises(InputError, match=r"^loss.supervised_conditioning must be 'shared' or 'separate', got "
                                         r"'sideways'$"):
        ScoreModel(net=NET, loss=LossConfig(supervised_conditioning="sideways"))


# ----------------------------------------------------------------------------------------- checkpoints
def test_a_checkpoint_without_the_option_loads_as_shared(tmp_path, save_score_model):
    from lfmri.models import load_score_model

    path = save_score_model(tmp_path / "old.ckpt", model("shared"))
    ckpt = torch.load(path, weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["loss"]["supervised_conditioning"] == "shared"
    # as written before the option existed: flat options (before the blocks), no supervised_conditioning
    old = {**{k: v for k, v in hp.items() if k not in ("loss", "optim")}, **hp["loss"], **hp["optim"]}
    del old["supervised_conditioning"]
    ckpt["hyper_parameters"] = old
    assert "supervised_conditioning" not in upgrade_hparams(old)["loss"]
    torch.save(ckpt, path)
    for loaded in (ScoreModel.load_from_checkpoint(path, map_location="cpu"),
                   load_score_model(path, torch.device("cpu"))):
        assert loaded.hparams.loss["supervised_conditioning"] == "shared"
        assert loaded.supervised_label_offset == 0.0
    # an older hyper-parameters dict passed to the constructor directly
    hparams = {k: v for k, v in upgrade_hparams(old).items() if not k.startswith("_")}
    assert ScoreModel(**hparams).hparams.loss["supervised_conditioning"] == "shared"


# ---------------------------------------------------------------------------------------- YAML and CLI
def _cli(tmp_path: Path, init_args: dict, *args: str) -> ScoreModel:
    config = {"model": {"class_path": "lightning_modules.module.ScoreModel",
                        "init_args": {"net": NET.to_dict(), **init_args}},
              "trainer": {"accelerator": "cpu", "logger": False}}
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(LightningModule, subclass_mode_model=True, run=False,
                       args=["--config", str(path), *args])
    return cli.model


def test_yaml_and_command_line_spelling(tmp_path):
    m = _cli(tmp_path, {"loss": {"supervised_weight": 1.0, "supervised_conditioning": "separate"}})
    assert isinstance(m, ScoreModel) and m.loss_config.supervised_conditioning == "separate"
    m = _cli(tmp_path, {"loss": {"supervised_weight": 1.0}},
             "--model.init_args.loss.supervised_conditioning=separate")
    assert m.loss_config == LossConfig(supervised_weight=1.0, supervised_conditioning="separate")
    m = _cli(tmp_path, {"loss": {"supervised_weight": 1.0}})
    assert m.loss_config.supervised_conditioning == "shared"


def test_dsm_only_from_yaml_and_the_command_line(tmp_path):
    b = batch()
    for m in (_cli(tmp_path, {"loss": {"dsm_weight": 1.0, "supervised_weight": 0.0}}),
              _cli(tmp_path, {"loss": {"supervised_weight": 1.0}},
                   "--model.init_args.loss.supervised_weight=0", "--model.init_args.loss.dsm_weight=1")):
        assert m.loss_config.dsm_weight == 1.0 and m.loss_config.supervised_weight == 0.0
        out = m._losses(b, torch.Generator().manual_seed(2), compute_all=False)
        assert set(out) == {"dsm", "loss"} and torch.equal(out["loss"], out["dsm"])
        out = m._losses(b, torch.Generator().manual_seed(2), compute_all=True)  # validation logs both
        assert set(out) == {"dsm", "supervised", "loss"} and torch.equal(out["loss"], out["dsm"])


@pytest.mark.usefixtures("lightning_logs_to_stderr")
def test_dsm_only_with_the_quickstart_config_through_lfmri(tmp_path):
    from lfmri.lightning_cli import run_lightning_cli

    cli = run_lightning_cli(["--config", str(QUICKSTART), f"--trainer.default_root_dir={tmp_path}/run",
                             "--model.init_args.net.nf=8", "--model.init_args.net.num_groups=4",
                             "--data.init_args.loader.num_workers=0", "--model.init_args.loss.dsm_weight=1",
                             "--model.init_args.loss.supervised_weight=0"], run=False)
    m = cli.model
    assert m.loss_config.dsm_weight == 1.0 and m.loss_config.supervised_weight == 0.0
    assert m.loss_config.supervised_conditioning == "separate"  # the quickstart's (issue 21)
    out = m._losses(batch(), torch.Generator().manual_seed(2), compute_all=False)
    assert set(out) == {"dsm", "loss"}


def _fit(tmp_path: Path, *args: str) -> int:
    from lfmri.cli import main

    return main(["fit", "--config", str(QUICKSTART), f"--trainer.default_root_dir={tmp_path}/run",
                 f"--data.init_args.source={tmp_path}/no-data", "--model.init_args.net.nf=8",
                 "--model.init_args.net.num_groups=4", *args])


@pytest.mark.usefixtures("lightning_logs_to_stderr")
def test_lfmri_fit_refuses_separate_with_a_family_in_one_line(tmp_path, capsys):
    rc = _fit(tmp_path, "--model.init_args.loss.supervised_conditioning=separate",
              "--model.init_args.pretrained.family=score_sde")
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert last.startswith("lfmri fit: error: loss.supervised_conditioning 'separate'"), last
    assert not (tmp_path / "run").exists()  # refused before anything was built or read


@pytest.mark.usefixtures("lightning_logs_to_stderr")
def test_lfmri_fit_refuses_an_unknown_conditioning(tmp_path, capsys):
    assert _fit(tmp_path, "--model.init_args.loss.supervised_conditioning=sideways") == 2  # while parsing
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("lfmri fit: error: model.init_args.loss.supervised_conditioning: "
                                            "expected one of 'shared', 'separate', got sideways"), err[-3000:]
    assert not (tmp_path / "run").exists()
