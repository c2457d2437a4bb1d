"""Fine-tuning and sampling through a checkpoint family's network, SDE and score
(`ScoreModel`'s `pretrained.family`) against the four real-format fixtures (tests/fixtures/*): the model's
score is `load_pretrained(...).score` (score_mri's 1-channel prior on the real and the imaginary part apart),
its losses are finite, reach the family network and decrease; the losses and samplers are right for every SDE
class (VP, discrete VP, VE: zero DSM at the exact score, the moments of a Gaussian); `lfmri fit` fine-tunes
from each fixture and `lfmri reconstruct` samples the resulting checkpoint, which rebuilds without the
original files."""

from __future__ import annotations

import importlib.resources
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from helpers import slice_sample
from torch.utils.data import default_collate

from datamodules.samples import SliceSample
from degradations import channels_to_complex, fft2c
from diffusion.checkpoint import CheckpointError
from diffusion.losses import dsm_loss, supervised_loss
from diffusion.networks.adm import ADMUNet
from diffusion.networks.ddpm import DDPMConfig
from diffusion.networks.families import FAMILIES, load_pretrained
from diffusion.sampling.samplers import SAMPLERS, build_sampler, pnp_sampler
from diffusion.sampling.sde import VESDE, VPSDE, DiscreteVPSDE
from lfmri.cli import main
from lfmri.models import read_lightning_checkpoint, score_model_from_checkpoint
from lfmri_utils.errors import InputError
from lightning_modules.module import LossConfig, OptimConfig, ScoreModel
from lightning_modules.priors import PretrainedSource

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
CKPT = {"score_sde": FIXTURES / "score_sde_tiny" / "checkpoint.pth",
        "hfs_sde": FIXTURES / "hfs_sde_vp_tiny" / "checkpoint.pth",
        "score_mri": FIXTURES / "score_mri_ncsnpp_ve_tiny" / "checkpoint.pth",
        "dds": FIXTURES / "dds_adm_tiny" / "checkpoint.pt"}
SDE_CLASS = {"score_sde": VPSDE, "hfs_sde": VPSDE, "score_mri": VESDE, "dds": DiscreteVPSDE}
CROP = {"score_sde": 16, "hfs_sde": 24, "score_mri": 24, "dds": 32}  # the fixture's image size, at most 32
MNI = importlib.resources.files("nilearn") / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(family: str, **kw) -> ScoreModel:
    """A ScoreModel on the family fixture with its pretrained weights loaded."""
    model = ScoreModel(pretrained=PretrainedSource(str(CKPT[family]), family=family),
                       optim=OptimConfig(warmup_steps=1), **kw)
    model.load_pretrained()
    return model


def _batch(size: int = 12, seed: int = 0) -> SliceSample:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(2, 2, size, size, generator=g).mul(0.3)
    degraded = clean + 0.1 * torch.randn(2, 2, size, size, generator=g)
    return default_collate([slice_sample(clean[i], degraded[i], i) for i in range(len(clean))])


# ------------------------------------------------------------------------------------- the family's score
@pytest.mark.parametrize("family", list(CKPT))
def test_score_fn_is_the_family_score(family: str) -> None:
    model = _model(family)
    ref = load_pretrained(CKPT[family], family=family)
    grid = torch.linspace(1e-3, 1, 50)
    assert type(model.sde) is SDE_CLASS[family] and model.sde.N == ref.sde.N
    assert model.train_size == {"score_sde": 16, "hfs_sde": 24, "score_mri": 24, "dds": 48}[family]
    assert torch.equal(model.sde.alpha(grid), ref.sde.alpha(grid))
    assert torch.equal(model.sde.std(grid), ref.sde.std(grid))
    x = torch.randn(3, 2, 18, 22, generator=torch.Generator().manual_seed(1))  # not a multiple of the U-Net's
    t = torch.tensor([0.02, 0.4, 0.9])
    with torch.no_grad():
        got = model.score_fn()(x, t)
        assert got.shape == x.shape and torch.isfinite(got).all()
        if ref.channels == 1:  # score_mri: the score of [re, im] is [prior(re), prior(im)]
            expected = torch.cat([ref.score(x[:, :1], t), ref.score(x[:, 1:], t)], dim=1)
        else:
            expected = ref.score(x, t)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.eval()(x, t), expected, rtol=1e-5, atol=1e-5)  # current weights


@pytest.mark.parametrize("family", list(CKPT))
def test_losses_are_finite_reach_the_network_and_decrease(family: str) -> None:
    model = _model(family, loss=LossConfig(supervised_weight=1.0))
    model.net.train()
    batch = _batch()
    opt = torch.optim.Adam([p for p in model.net.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(6):  # the same noise every step: the loss of one fixed draw
        out = model._losses(batch, torch.Generator().manual_seed(0), compute_all=True)
        assert all(torch.isfinite(v) for v in out.values()), out
        opt.zero_grad()
        out["loss"].backward()
        grads = [p.grad for p in model.net.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
        opt.step()
        losses.append(float(out["loss"]))
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("family", list(CKPT))
def test_gradient_checkpointing_reaches_the_family_network_and_keeps_the_gradients(family: str) -> None:
    grads = {}
    for flag in (False, True):
        model = _model(family, grad_checkpointing=flag)
        net = model.net
        on = net.unet.is_gradient_checkpointing if isinstance(net, ADMUNet) else net.grad_checkpointing
        assert on == flag
        net.train()
        torch.manual_seed(0)  # the same dropout draws in both runs
        out = model._losses(_batch(), torch.Generator().manual_seed(0), compute_all=True)
        out["loss"].backward()
        grads[flag] = [p.grad for p in net.parameters() if p.requires_grad]
    for a, b in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------- losses for every SDE
SDES = [VPSDE(), DiscreteVPSDE(), VESDE(0.01, 50.0)]


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_dsm_and_supervised_are_zero_at_the_exact_score(sde) -> None:
    x = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    seen: list[torch.Tensor] = []

    def exact(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # score of p(x_t | x_0 = x)
        seen.append(t)
        mean, std = sde.marginal_prob(x, t)
        return -(xt - mean) / std[:, None, None, None] ** 2

    assert float(dsm_loss(None, sde, x, score_fn=exact, generator=torch.Generator().manual_seed(3))) < 1e-8
    if isinstance(sde, DiscreteVPSDE):  # DDPM training: integer steps, all over the chain
        steps = seen[0] * (sde.N - 1)
        torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)
    # the supervised Tweedie step recovers x exactly when the degraded slice is x
    loss = supervised_loss(None, sde, x, x, score_fn=exact, generator=torch.Generator().manual_seed(4))
    assert float(loss) < 1e-4
    # and a wrong score is penalised
    assert float(dsm_loss(None, sde, x, score_fn=lambda xt, t: torch.zeros_like(xt))) > 0.5


# ---------------------------------------------------------------------------------- samplers, every SDE
S = 0.5
MU = torch.linspace(-1, 1, 128, dtype=torch.float64).reshape(1, 2, 8, 8)
B = 512


@pytest.mark.parametrize("name", [n for n, spec in SAMPLERS.items() if spec.sample_fn is not pnp_sampler])
@pytest.mark.parametrize("sde", [DiscreteVPSDE(), VESDE(0.01, 50.0)], ids=lambda s: type(s).__name__)
def test_samplers_draw_the_gaussian_of_any_sde(sde, name: str) -> None:
    """Data N(MU, S^2) per pixel: the samplers on the SDE's own marginals draw it (moments within 5 standard
    errors of the mean, 5 % of the variance). The point estimates (PnP, Tweedie) draw nothing: their test is
    that they give the posterior mean (test_estimators.py)."""

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = sde.alpha(t).double()[:, None, None, None]
        sd = sde.std(t).double()[:, None, None, None]
        return -(x - a * MU) / (a**2 * S**2 + sd**2)

    warm = SAMPLERS[name].t0 < 1
    x_init = MU + S * torch.randn(B, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    steps = 100 if warm else 200
    sampler = build_sampler(name, steps=steps, t0=0.5 if warm else 1.0, dc="none", sde=sde)
    start = x_init if warm else torch.zeros_like(x_init)
    x = sampler(score, start, generator=torch.Generator().manual_seed(6))
    assert ((x.mean(0) - MU).abs() < 5 * S / B**0.5).all()
    assert abs(float(x.var(0).mean()) / S**2 - 1) < 0.05


# -------------------------------------------------------------------------------------------- refusals
def test_bad_family_options_are_one_line_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="pretrained.family must be null or one of " + ", ".join(FAMILIES)):
        ScoreModel(pretrained=PretrainedSource(str(CKPT["dds"]), family="ddpm++"))
    with pytest.raises(InputError, match=f"pretrained.path {tmp_path / 'gone.pt'}: no such file"):
        ScoreModel(pretrained=PretrainedSource(str(tmp_path / "gone.pt"), family="dds"))
    alone = tmp_path / "alone.pt"
    shutil.copy(CKPT["dds"], alone)
    with pytest.raises(InputError, match="no config.json beside it; pass pretrained.config"):
        ScoreModel(pretrained=PretrainedSource(str(alone), family="dds"))
    with pytest.raises(InputError, match="needs pretrained.path"):
        ScoreModel(pretrained=PretrainedSource(family="dds"))
    with pytest.raises(InputError, match="needs pretrained.family"):
        ScoreModel(pretrained=PretrainedSource(weights="family"))
    one_channel = yaml.safe_load((CKPT["score_sde"].with_name("config.json")).read_text())
    one_channel["data"]["num_channels"] = 1
    with pytest.raises(InputError, match="takes 1 channel"):  # a 1-channel prior without a complex rule
        ScoreModel(pretrained=PretrainedSource(family="score_sde", config=one_channel))
    with pytest.raises(InputError, match="hfs_sde field"):  # another family's config
        ScoreModel(pretrained=PretrainedSource(family="score_sde",
                                               config=str(CKPT["hfs_sde"].with_name("config.json"))))


# ------------------------------------------------------------------------------- lfmri fit, reconstruct
@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real MNI-derived 32 x 32 x 2 magnitude volume."""
    img = nib.load(str(MNI))
    data = np.asarray(img.dataobj, dtype=np.float32)[20:180:5, 30:190:5, 80:110:20]
    path = tmp_path_factory.mktemp("family_volume") / "square.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), path)
    return path


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.usefixtures("lightning_logs_to_stderr")
@pytest.mark.parametrize("family", list(CKPT))
def test_fit_finetunes_from_the_family_and_reconstruct_samples_it(family: str, tmp_path: Path,
                                                                  volume: Path) -> None:
    prior = tmp_path / "prior"  # a copy, removed after fitting: the checkpoint must not need it
    shutil.copytree(CKPT[family].parent, prior)
    run = tmp_path / "run"
    # configs/finetune_mouse.yaml, shrunk for the CPU: 2 steps, 32-bit, bundled volumes, the fixture's size;
    # the family is given for score_sde (whose DDPM the flat arguments describe otherwise) and detected from
    # the config.json beside the file for the others
    family_flag = [f"--model.init_args.pretrained.family={family}"] if family == "score_sde" else []
    assert main(["fit", "--config", str(REPO / "configs/finetune_mouse.yaml"),
                 "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.max_steps=2",
                 "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
                 "--trainer.logger=false",
                 "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                 f"--trainer.default_root_dir={run}",
                 f"--model.init_args.pretrained.path={prior / CKPT[family].name}", *family_flag,
                 "--model.init_args.pretrained.weights=family", "--model.init_args.optim.lr=1e-3",
                 "--model.init_args.optim.warmup_steps=1", "--model.init_args.optim.ema_decay=0.9",
                 "--data.init_args.source={class_path: BundledSource, init_args: {n_train: 1, n_val: 1}}",
                 f"--data.init_args.slices.crop_size={CROP[family]}", "--data.init_args.loader.batch_size=2",
                 "--data.init_args.loader.num_workers=0"]) == 0
    last = run / "checkpoints" / "last.ckpt"
    shutil.rmtree(prior)

    ckpt = read_lightning_checkpoint(last)
    assert ckpt["global_step"] == 2 and isinstance(ckpt["hyper_parameters"]["pretrained"]["config"], dict)
    tuned = score_model_from_checkpoint(ckpt, last)
    ref = load_pretrained(CKPT[family], family=family, weights="family")
    assert type(tuned.sde) is SDE_CLASS[family] and type(tuned.net) is type(ref.network)
    # fine-tuned from the family's weights: two Adam steps of lr 1e-3 move each weight by about 1e-3 at most
    change = [float((a.double() - b.double()).abs().max()) for a, b in
              zip(tuned.net.state_dict().values(), ref.network.state_dict().values(), strict=True)]
    assert 0 < max(change) < 3e-3, max(change)

    out = tmp_path / "rec.nii.gz"
    assert main(["reconstruct", str(volume), str(out), "--ckpt", str(last), "--regime", "noise_blur",
                 "--sampling.steps", "2", "--device", "cpu", "--sampling.sampler", "warm_ddim"]) == 0
    rec = np.asarray(nib.load(str(out)).dataobj, dtype=np.float32)
    assert rec.shape == (32, 32, 2) and np.isfinite(rec).all() and rec.max() > 0
    # export in the family's own format: read back with the original's conventions, the fine-tuned scores
    x = torch.randn(2, 2, 20, 20, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.05, 0.6])
    with torch.no_grad():
        scores = {use_ema: tuned.score_fn(use_ema)(x, t) for use_ema in (True, False)}
    assert not torch.allclose(scores[True], scores[False])  # EMA (decay 0.9) and the weights differ
    for weights in ("ema", "model"):
        out = tmp_path / f"export_{weights}{CKPT[family].suffix}"
        assert main(["export", "--ckpt", str(last), str(out), "--weights", weights]) == 0
        config = out.with_suffix(".json")
        if family != "dds":
            assert yaml.safe_load(config.read_text())["optim"]["lr"] == 1e-3
        for read in (("ema", "model") if family != "dds" else ("model",)):  # DDS: one set of weights
            detect = family if family == "score_sde" else None  # the others: from the exported config
            back = load_pretrained(out, config, family=detect, weights=read)
            assert back.family.name == family
            with torch.no_grad():
                got = (torch.cat([back.score(x[:, :1], t), back.score(x[:, 1:], t)], dim=1)
                       if back.channels == 1 else back.score(x, t))
            torch.testing.assert_close(got, scores[weights == "ema" or read == "ema"], rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("lightning_logs_to_stderr")
def test_fit_refuses_an_unknown_family_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["fit", "--config", str(REPO / "configs/quickstart.yaml"),
               f"--trainer.default_root_dir={tmp_path}", f"--model.init_args.pretrained.path={CKPT['dds']}",
               "--model.init_args.pretrained.family=adm"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "pretrained.family must be null or one of score_sde, hfs_sde" in lines[-1], lines[-3:]


# ------------------------------------------------------------------------------------ family detection
@pytest.mark.parametrize("family", ["hfs_sde", "score_mri", "dds"])
@pytest.mark.parametrize("where", ["pretrained.config", "beside"])
def test_the_family_is_detected_from_the_checkpoint_config(family: str, where: str, tmp_path: Path) -> None:
    """The issue's silent wrong scores: an HFS-SDE checkpoint once loaded "strictly" as score_sde's DDPM and
    scored wrong. Without pretrained.family, a config that names another family (HFS-SDE's normalize_*
    fields, an NCSN++, a guided-diffusion config) selects it: the model scores as the family's original code,
    and the detected family is kept in the hyper-parameters."""
    if where == "beside":
        folder = tmp_path / "prior"
        shutil.copytree(CKPT[family].parent, folder)
        model = ScoreModel(pretrained=PretrainedSource(str(folder / CKPT[family].name)))
    else:
        model = ScoreModel(pretrained=PretrainedSource(str(CKPT[family]),
                                                       config=str(CKPT[family].with_name("config.json"))))
    assert model.hparams.pretrained["family"] == family
    model.load_pretrained()
    ref = load_pretrained(CKPT[family], family=family)
    x = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.1, 0.7])
    with torch.no_grad():
        expected = (torch.cat([ref.score(x[:, :1], t), ref.score(x[:, 1:], t)], dim=1) if ref.channels == 1
                    else ref.score(x, t))
        torch.testing.assert_close(model.score_fn()(x, t), expected, rtol=1e-5, atol=1e-5)


def test_score_sde_configs_stay_on_the_plain_path_and_other_networks_without_config_are_refused(
        tmp_path: Path) -> None:
    net = dict(net=DDPMConfig(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16))
    ok = ScoreModel(**net, pretrained=PretrainedSource(str(CKPT["score_sde"]),
                                                       config=str(CKPT["score_sde"].with_name("config.json"))))
    assert ok.hparams.pretrained["family"] is None and ok.prior is None
    ok.load_pretrained()
    # a score_sde DDPM config whose SDE is not score_sde's: refused on the plain path, one line
    config = yaml.safe_load(CKPT["score_sde"].with_name("config.json").read_text())
    config["training"] = {"sde": "vesde", "continuous": True}
    with pytest.raises(InputError) as err:
        source = PretrainedSource(str(CKPT["score_sde"]), config=config)
        ScoreModel(**net, pretrained=source).load_pretrained()
    assert "\n" not in str(err.value) and "training.sde" in str(err.value)
    # an NCSN++ file without its config: the plain path cannot read it and names the family option
    alone = tmp_path / "checkpoint.pth"
    shutil.copy(CKPT["score_mri"], alone)
    model = ScoreModel(**net, pretrained=PretrainedSource(str(alone)))
    with pytest.raises(CheckpointError) as err:
        model.load_pretrained()
    line = str(err.value)
    assert "\n" not in line and str(alone) in line and "pretrained.family=score_mri" in line


# ------------------------------------------------------------------------------ per-family data range
def test_the_hfs_sde_data_scale_is_its_kspace_std_normalisation() -> None:
    """HFS-SDE trained on k-space divided by 1.5 x its std (numpy's complex std): `data_scale` is that factor
    per slice, with the measured noise variance taken off; the other families keep lfmri's units."""
    g = torch.Generator().manual_seed(0)
    amplitude = torch.tensor([0.5, 1.0, 3.0])[:, None, None, None]
    x = torch.randn(3, 1, 20, 24, dtype=torch.complex64, generator=g) * amplitude
    k = fft2c(x)
    hfs = load_pretrained(CKPT["hfs_sde"], family="hfs_sde")
    expected = torch.tensor([1 / (1.5 * np.std(k[i].numpy())) for i in range(3)], dtype=torch.float32)
    torch.testing.assert_close(hfs.data_scale(k), expected, rtol=1e-5, atol=0)
    sigma = torch.tensor([0.2, 0.5, 1.0])
    noisy = k + sigma[:, None, None, None] * torch.randn(k.shape, dtype=torch.complex64, generator=g)
    torch.testing.assert_close(hfs.data_scale(noisy, sigma), expected, rtol=0.05, atol=0)
    assert float((hfs.data_scale(noisy) / expected).max()) < 0.99  # without the noise term: too small
    for family in ("score_sde", "score_mri", "dds"):
        assert torch.equal(load_pretrained(CKPT[family], family=family).data_scale(k), torch.ones(3))
        assert _model(family).data_scale is None
    assert _model("hfs_sde").data_scale is not None


def test_hfs_sde_trains_on_its_own_data_range() -> None:
    """The losses see each slice multiplied by its clean k-space factor (here 1 / (1.5 std)), the same for
    the clean and the degraded slice."""
    model = _model("hfs_sde", loss=LossConfig(supervised_weight=1.0))
    model.net.eval()  # no dropout: both computations see the same network
    batch = _batch(size=24)
    got = model._losses(batch, torch.Generator().manual_seed(0), compute_all=True)
    c = model.prior.data_scale(fft2c(channels_to_complex(batch.clean)))[:, None, None, None]
    assert float(c.min()) > 1.5  # slices of std 0.3: a material change of range
    scaled = batch._replace(clean=batch.clean * c, degraded=batch.degraded * c)
    gen = torch.Generator().manual_seed(0)
    dsm = dsm_loss(model.net, model.sde, scaled.clean, generator=gen, score_fn=model.prior.score)
    sup = supervised_loss(model.net, model.sde, scaled.degraded, scaled.clean,
                          t0_range=model.loss_config.supervised_t0, generator=gen,
                          score_fn=model.prior.score)
    torch.testing.assert_close(got["dsm"], dsm)
    torch.testing.assert_close(got["supervised"], sup)
