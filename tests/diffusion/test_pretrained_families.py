"""`load_pretrained` against checkpoints written by each family's original code (tests/fixtures/*, every fact
in the folder's README): the networks reproduce the recorded raw outputs and `.score` the recorded scores to
1e-5 relative (max |difference| / max |reference|), for the `model` and the EMA weights; mismatches are
refused with one line; the released configurations instantiate with their exact parameter counts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import diffusion
from diffusion.networks.adm import _join_qkv, _split_qkv
from diffusion.networks.families import (
    FAMILIES,
    _build_network,
    load_pretrained,
    read_config,
    resolve_config,
)
from diffusion.sampling.sde import VESDE, VPSDE, DiscreteVPSDE, get_score_fn
from lfmri_utils.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

BENCHMARKS = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CKPT = {"score_sde": FIXTURES / "score_sde_tiny" / "checkpoint.pth",
        "hfs_sde": FIXTURES / "hfs_sde_vp_tiny" / "checkpoint.pth",
        "score_mri": FIXTURES / "score_mri_ncsnpp_ve_tiny" / "checkpoint.pth",
        "dds": FIXTURES / "dds_adm_tiny" / "checkpoint.pt"}
TOL = 1e-5


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    """max |actual - expected| <= tol * max |expected| (shapes equal)."""
    assert actual.shape == expected.shape
    err = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert err <= tol, f"relative error {err:.2e} > {tol:g}"


_CACHE: dict[tuple[str, str], diffusion.Pretrained] = {}


def loaded(family: str, weights: str) -> diffusion.Pretrained:
    if (family, weights) not in _CACHE:
        _CACHE[family, weights] = diffusion.load_pretrained(CKPT[family], weights=weights)
    return _CACHE[family, weights]


def io(family: str) -> dict[str, torch.Tensor]:
    return torch.load(CKPT[family].with_name("io.pt"), weights_only=True)


# ----------------------------------------------------------------------------------- recorded outputs, scores
@pytest.mark.parametrize("weights", ["model", "ema"])
@pytest.mark.parametrize("family", list(CKPT))
def test_detected_family_and_labels(family, weights):
    p = loaded(family, weights)
    assert p.family.name == family  # detected from the file and its config.json
    assert not p.network.training
    rec = io(family)
    t = rec["t_int"].float() / 999 if family == "dds" else rec["t"]
    expected = rec["t"] if family == "dds" else rec["labels"]
    assert_rel(p.labels(t), expected, 1e-6)


@pytest.mark.parametrize("weights", ["model", "ema"])
@pytest.mark.parametrize("family", list(CKPT))
def test_network_reproduces_the_recorded_raw_outputs(family, weights):
    p, rec = loaded(family, weights), io(family)
    key = {"score_sde": {"model": "out_model", "ema": "out_ema_model"}[weights], "dds": "out"}.get(
        family, f"out_{weights}")
    labels = rec["t"] if family == "dds" else rec["labels"]
    with torch.no_grad():
        assert_rel(p.network(rec["x"], labels), rec[key])


@pytest.mark.parametrize("weights", ["model", "ema"])
@pytest.mark.parametrize("family", ["hfs_sde", "score_mri", "dds"])
def test_score_reproduces_the_recorded_scores(family, weights):
    p, rec = loaded(family, weights), io(family)
    t = rec["t_int"].float() / 999 if family == "dds" else rec["t"]  # dds: step round(t * 999)
    key = "score" if family == "dds" else f"score_{weights}"
    with torch.no_grad():
        assert_rel(p.score(rec["x"], t), rec[key])
        if family == "score_mri":  # 1-channel prior on the real and the imaginary part separately
            assert_rel(p.score(rec["x_complex"], t), rec[f"score_complex_{weights}"])


def test_dds_weights_are_the_files_and_its_schedule_is_dds():
    rec = io("dds")
    p = loaded("dds", "ema")
    assert p.weights == "file"  # a bare state dict: one set of weights, for either request
    assert isinstance(p.sde, DiscreteVPSDE)
    assert torch.equal(p.sde.discrete_betas, rec["betas"])
    assert torch.equal(p.sde.alphas_cumprod, rec["alphas_cumprod"])
    t = rec["t_int"].float() / 999
    assert torch.equal(p.sde.alpha_bar(t), rec["alpha_bar_t"])
    with torch.no_grad():  # float and int64 timesteps give the same output
        assert_rel(p.network(rec["x"], rec["t_int"]), rec["out"])
        std, alpha = p.sde.std(t)[:, None, None, None], p.sde.alpha(t)[:, None, None, None]
        x0 = (rec["x"] - std * rec["eps_pred"]) / alpha
        assert_rel(x0, rec["x0_pred"])


def test_score_sde_score_is_todays_vp_score():
    rec = io("score_sde")
    p = loaded("score_sde", "ema")
    assert isinstance(p.sde, VPSDE) and (p.sde.beta_min, p.sde.beta_max) == (0.1, 20.0)
    with torch.no_grad():
        x, t = rec["x"], rec["t"]
        torch.testing.assert_close(p.score(x, t), get_score_fn(p.network, VPSDE())(x, t))
        assert_rel(p.score(x, t), -rec["out_ema_model"] / p.sde.std(t)[:, None, None, None])


def test_family_weights_are_what_each_original_samples_with():
    assert diffusion.load_pretrained(CKPT["hfs_sde"], weights="family").weights == "model"
    assert diffusion.load_pretrained(CKPT["score_mri"], weights="family").weights == "ema"


def test_score_mri_ema_takes_the_fourier_w_from_model():
    ckpt = torch.load(CKPT["score_mri"], weights_only=True)
    w = loaded("score_mri", "ema").network.all_modules[0].W
    assert not w.requires_grad
    assert torch.equal(w, ckpt["model"]["module.all_modules.0.W"])
    assert len(ckpt["ema"]["shadow_params"]) == 180  # the trainable parameters only


def test_score_takes_a_float_time_and_refuses_other_channel_counts():
    p = loaded("score_mri", "ema")
    x = io("score_mri")["x"]
    with torch.no_grad():
        torch.testing.assert_close(p.score(x[:1], 0.5), p.score(x[:1], torch.tensor([0.5])))
        with pytest.raises(ValueError, match="takes 1 .or 2: real and imaginary"):
            p.score(torch.zeros(1, 3, 24, 24), 0.5)


# ------------------------------------------------------------------------------------------------- refusals
def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def _config(family: str) -> dict:
    return json.loads(CKPT[family].with_name("config.json").read_text())


def test_family_and_file_mismatches_are_refused():
    with pytest.raises(InputError, match="needs score_sde's NCSN\\+\\+ checkpoint, the file holds "
                       "score_sde's DDPM") as err:
        load_pretrained(CKPT["hfs_sde"], family="score_mri")
    _one_line(err)
    with pytest.raises(InputError, match="needs a guided-diffusion ADM checkpoint"):
        load_pretrained(CKPT["score_sde"], family="dds")
    with pytest.raises(InputError, match="needs score_sde's DDPM"):
        load_pretrained(CKPT["dds"], family="score_sde")


def test_an_hfs_sde_checkpoint_is_not_read_as_score_sde():
    with pytest.raises(InputError, match="data.normalize_type, a hfs_sde field.*pass "
                       "family='hfs_sde'") as err:
        load_pretrained(CKPT["hfs_sde"], family="score_sde")
    _one_line(err)


def test_config_values_that_contradict_the_family_are_refused(tmp_path):
    cfg = _config("hfs_sde")
    cfg["training"]["sde"] = "vesde"
    with pytest.raises(InputError, match="training.sde = 'vesde' does not fit family 'hfs_sde'"):
        load_pretrained(CKPT["hfs_sde"], config=cfg)
    cfg = _config("score_mri")
    cfg["model"]["progressive"] = "output_skip"
    with pytest.raises(InputError, match="model.progressive = 'output_skip' does not fit family 'score_mri'"):
        load_pretrained(CKPT["score_mri"], config=cfg)
    cfg = _config("score_sde")
    cfg["training"] = {"continuous": False}  # score_sde's discrete DDPM labels are another convention
    with pytest.raises(InputError, match="training.continuous = False does not fit family 'score_sde'"):
        load_pretrained(CKPT["score_sde"], config=cfg)


def test_configs_that_cannot_establish_the_conventions_are_refused(tmp_path):
    cfg = _config("score_mri")
    del cfg["model"]["sigma_max"], cfg["data"]["centered"]
    with pytest.raises(InputError, match="cannot establish the score_mri conventions, the config lacks "
                       "data.centered, model.sigma_max") as err:
        load_pretrained(CKPT["score_mri"], config=cfg)
    _one_line(err)
    lone = tmp_path / "checkpoint.pth"
    lone.write_bytes(CKPT["hfs_sde"].read_bytes())
    with pytest.raises(InputError, match="cannot establish its conventions without its config"):
        load_pretrained(lone)


def test_a_state_dict_that_does_not_fit_the_config_is_refused():
    cfg = _config("hfs_sde")
    cfg["model"]["ch_mult"] = [1, 2]
    with pytest.raises(InputError, match="does not fit the hfs_sde config .2 missing, 0 unexpected.: first "
                       "missing key 'module.all_modules.5.NIN_0.W'"):
        load_pretrained(CKPT["hfs_sde"], config=cfg)
    cfg["model"].update(ch_mult=[1, 1], nf=64)
    with pytest.raises(InputError, match="does not fit the hfs_sde config: 'module.all_modules.0.weight' has "
                       "shape .128, 32. in the checkpoint, .256, 64. in the network"):
        load_pretrained(CKPT["hfs_sde"], config=cfg)
    cfg = _config("dds")
    cfg["model"]["num_res_blocks"] = 2
    with pytest.raises(InputError, match="does not fit the dds config"):
        load_pretrained(CKPT["dds"], config=cfg)


def test_unknown_family_weights_and_a_missing_ema_are_refused(tmp_path):
    with pytest.raises(InputError, match="unknown checkpoint family 'ddim'"):
        load_pretrained(CKPT["hfs_sde"], family="ddim")
    with pytest.raises(InputError, match="weights must be"):
        load_pretrained(CKPT["hfs_sde"], weights="best")
    ckpt = torch.load(CKPT["hfs_sde"], weights_only=True)
    torch.save(ckpt["model"], tmp_path / "checkpoint.pth")  # a bare score_sde network state dict
    (tmp_path / "config.json").write_text(json.dumps(_config("hfs_sde")))
    with pytest.raises(InputError, match="no EMA weights in the checkpoint; use weights='model'"):
        load_pretrained(tmp_path / "checkpoint.pth")
    assert load_pretrained(tmp_path / "checkpoint.pth", weights="model").weights == "model"


# ------------------------------------------------------------------------------------------------ .py configs
_DEFAULTS_PY = '''import ml_collections
import torch


def get_default_configs():
    config = ml_collections.ConfigDict()
    config.training = training = ml_collections.ConfigDict()
    training.continuous = True
    config.data = data = ml_collections.ConfigDict()
    data.centered = False
    data.num_channels = 1
    config.model = model = ml_collections.ConfigDict()
    model.sigma_max = 378
    model.sigma_min = 0.01
    model.num_scales = 2000
    model.dropout = 0.
    model.embedding_type = 'fourier'
    config.device = torch.device('cuda:0') if torch.cuda.is_available() else torch.device('cpu')
    return config
'''

_RUN_PY = '''"""A score-MRI style run config (written for this test)."""
from configs.default_test_configs import get_default_configs


def get_config():
    config = get_default_configs()
    training = config.training
    training.sde = 'vesde'
    data = config.data
    data.image_size = 12 * 2
    model = config.model
    model.name = 'ncsnpp'
    model.scale_by_sigma = True
    model.nf = 8
    model.ch_mult = (1, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = True
    model.fir_kernel = [1, 3, 3, 1]
    model.skip_rescale = True
    model.resblock_type = 'biggan'
    model.progressive = 'none'
    model.progressive_input = 'residual'
    model.progressive_combine = 'sum'
    model.attention_type = 'ddpm'
    model.init_scale = 0.
    model.fourier_scale = 16
    if training.sde == 'vpsde':
        model.fourier_scale = 1
    return config
'''


def test_a_score_sde_py_config_is_read_without_running_it(tmp_path):
    (tmp_path / "configs" / "ve").mkdir(parents=True)
    (tmp_path / "configs" / "default_test_configs.py").write_text(_DEFAULTS_PY)
    run = tmp_path / "configs" / "ve" / "run.py"
    run.write_text(_RUN_PY)
    cfg = read_config(run)
    assert cfg["model"]["ch_mult"] == (1, 2) and cfg["data"]["image_size"] == 24 and cfg["device"] == "cpu"
    p = load_pretrained(CKPT["score_mri"], config=run, weights="ema")
    rec = io("score_mri")
    with torch.no_grad():
        assert_rel(p.score(rec["x"], rec["t"]), rec["score_ema"])


def test_a_py_config_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "config.py"
    bad.write_text(f"import os\n\ndef get_config():\n    os.system('touch {marker}')\n    return {{}}\n")
    with pytest.raises(InputError, match=r"config.py:4: a config file lfmri cannot read without running it "
                       r"\(call os.system\(...\)\)") as err:
        read_config(bad)
    _one_line(err)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ conversions
def test_adm_state_dict_round_trips_and_qkv_is_split_per_head():
    p = loaded("dds", "model")
    original = torch.load(CKPT["dds"], weights_only=True)
    back = p.network.guided_diffusion_state_dict()
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)
    heads, ch, c = 2, 3, 6  # legacy order: rows [q_0 k_0 v_0 q_1 k_1 v_1], each ch rows
    qkv = torch.arange(3 * c * c, dtype=torch.float32).reshape(3 * c, c, 1)
    q, k, v = _split_qkv(qkv, heads)
    torch.testing.assert_close(q, torch.cat([qkv[0:ch, :, 0], qkv[3 * ch:4 * ch, :, 0]]))
    torch.testing.assert_close(v, torch.cat([qkv[2 * ch:3 * ch, :, 0], qkv[5 * ch:6 * ch, :, 0]]))
    torch.testing.assert_close(_join_qkv(q, k, v, heads), qkv)


def test_ve_and_discrete_vp_sdes():
    ve = VESDE(sigma_min=0.01, sigma_max=378.0, N=2000)
    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(ve.std(t), torch.tensor([0.01, 0.01 * 37800**0.5, 378.0]))
    _, g = ve.discretize(torch.zeros(3, 1, 2, 2), torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(g[0], ve.discrete_sigmas[0])
    torch.testing.assert_close(g[2] ** 2, ve.discrete_sigmas[-1] ** 2 - ve.discrete_sigmas[-2] ** 2)
    dv = DiscreteVPSDE()
    assert (dv.beta_min, dv.beta_max) == pytest.approx((0.1, 20.0))
    steps = dv.index(torch.tensor([0.0, 0.4999 / 999, 0.5, 1.0]))
    torch.testing.assert_close(steps, torch.tensor([0, 0, 500, 999]))
    mean, std = dv.marginal_prob(torch.ones(1, 1, 1, 1), torch.tensor([1.0]))
    torch.testing.assert_close(mean.flatten() ** 2 + std**2, torch.ones(1))


# ---------------------------------------------------------------------------------------- released sizes
def _released(family: str) -> dict:
    """The fixture's config with every `fixture.changed_from_real` entry set back to the released value:
    the GPU benchmark's `released_config` (experiments/benchmarks/families.py), checked here."""
    spec = importlib.util.spec_from_file_location("bench_families", BENCHMARKS / "families.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.released_config(family)


@pytest.mark.parametrize(("family", "total", "trainable"), [
    ("score_sde", 34_425_602, 34_425_602),  # the seed's 34.4M DDPM (the fixture records no release)
    ("hfs_sde", 34_425_602, 34_425_602),  # score_sde's DDPM at 320 px, 2 channels (the seed's 34.4M)
    ("score_mri", 61_433_601, 61_433_473),  # + the 128-element Fourier W, not trainable
    ("dds", 361_428_228, 361_428_228),
])
def test_released_configurations_have_their_exact_parameter_counts(family, total, trainable):
    fam = FAMILIES[family]
    net = _build_network(fam, resolve_config(fam, _released(family), "released"))  # on the meta device
    assert sum(p.numel() for p in net.parameters()) == total
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == trainable
    assert all(p.is_meta for p in net.parameters())


# ------------------------------------------------------------------------------------- fine-tuning helpers
@pytest.mark.parametrize("family", ["score_mri", "dds"])
def test_gradient_checkpointing_keeps_outputs_and_gradients_and_any_size_runs(family):
    p = loaded(family, "model")
    net = p.network
    x = io(family)["x"][:2, :, :20, :22]  # not multiples of the U-Net's 2**(levels - 1): padded, cropped back
    labels = p.labels(torch.tensor([0.3, 0.7]))

    def run(checkpointing: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if family == "score_mri":
            net.grad_checkpointing = checkpointing
        elif checkpointing:
            net.unet.enable_gradient_checkpointing()
        else:
            net.unet.disable_gradient_checkpointing()
        net.train()
        net.zero_grad()
        out = net(x, labels)
        out.square().mean().backward()
        grad = next(q for q in net.parameters() if q.requires_grad).grad.clone()
        return out.detach(), grad

    try:
        out0, grad0 = run(False)
        out1, grad1 = run(True)
    finally:
        run(False)
        net.zero_grad(set_to_none=True)
        net.eval()
    assert out0.shape[-2:] == (20, 22)
    torch.testing.assert_close(out1, out0)
    torch.testing.assert_close(grad1, grad0)
