"""The parallel-imaging and compressed-sensing baselines (issue 24): the SigPy wrapper of the operator is
exact, CG-SENSE solves its normal equations, the baselines run on single-coil data, and on an 8-coil 4x
Colin27 measurement with ESPIRiT maps CG-SENSE beats the zero-filled RSS and L1-wavelet / TV CS beat CG-SENSE
at their tuned weights (a 100x weight does worse)."""

from __future__ import annotations

import ast
import math

import nibabel as nib
import numpy as np
import pytest
import sigpy
import torch
from helpers import REPO

from datamodules.transforms import to_slices
from degradations import Measurement, birdcage_sensitivities, fft2c, ifft2c, make_regime, neutral_params
from degradations import classical as cs_baselines
from degradations.classical import operator_linop
from lfmri.baselines import BASELINES, parse_baselines, tune_baseline
from lfmri_utils.metrics import psnr_volume, ssim_volume

pytestmark = pytest.mark.usefixtures("one_thread")
COLIN = REPO / "datamodules" / "data" / "colin27_ch2.nii.gz"
CS = ("zero_filled_rss", "cg_sense", "l1_wavelet", "tv_cs")


def _simulate(x: torch.Tensor, regime: str, seed: int, espirit: bool = True, **overrides: object
              ) -> Measurement:
    """The measurement of complex images x [S,1,H,W] under a regime; with `espirit` the true coil maps are
    dropped and `Measurement.from_kspace` estimates them by ESPIRiT (the noise std stays the recorded one)."""
    degradation = make_regime(regime, **overrides)
    y, params = degradation(x, torch.Generator().manual_seed(seed))
    if not espirit:
        return Measurement.simulated(y, params, degradation)
    kept = {k: v for k, v in params.items() if k not in ("sensitivities", "noise_sigma")}
    return Measurement.from_kspace(y, kept, params["noise_sigma"], "recorded", *degradation.b0_settings)


@pytest.fixture(scope="module")
def colin() -> np.ndarray:
    """Axial Colin27 slices 80 (validation) and 90 (test) as [2, 181, 96]: every phase-encoding line (H) so an
    8 % centre is 14 lines (ESPIRiT needs more than 8), the readout (W) cropped to 96 for speed; normalised
    by the volume's 99.5th percentile."""
    vol = np.asarray(nib.load(str(COLIN)).dataobj, dtype=np.float32)
    stack = to_slices(vol / np.percentile(vol, 99.5), 2)[[80, 90]]
    return np.ascontiguousarray(stack[:, :, 60:156])


def test_the_sigpy_wrapper_is_the_operator_and_its_exact_adjoint() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 24, 32, generator=g, dtype=torch.complex128).to(torch.complex64)
    m = _simulate(x, "noise_blur_t2star_b0", 0, espirit=False, acceleration=2, center_fraction=0.3,
                  mask="random", coils=4)
    A = operator_linop(m, slice(0, 2), dtype=torch.complex128)
    assert A.oshape == [2, 4, 24, 32] and A.ishape == [2, 24, 32]
    u = torch.randn(2, 24, 32, generator=g, dtype=torch.complex128).numpy()
    v = torch.randn(2, 4, 24, 32, generator=g, dtype=torch.complex128).numpy()
    Au, AHv = A(u), A.H(v)
    np.testing.assert_allclose(Au, m.operator().forward(torch.from_numpy(u)[:, None]).numpy(), rtol=1e-12)
    assert np.abs(Au * (1 - m.mask.numpy())).max() == 0  # unsampled rows are zero
    lhs, rhs = np.vdot(Au, v), np.vdot(u, AHv)  # <A u, v> = <u, A^H v>
    assert abs(lhs - rhs) < 1e-10 * abs(lhs)
    assert A.H.H.adjoint is False and AHv.dtype == np.complex128


def test_cg_sense_solves_its_normal_equations_like_sigpys_cg() -> None:
    x = torch.zeros(1, 1, 32, 32, dtype=torch.complex64)
    x[0, 0, 8:24, 6:26] = 1.0
    m = _simulate(x, "noise_blur", 1, espirit=False, snr_db=20.0, acceleration=2, center_fraction=0.25,
                  mask="equispaced", coils=4)
    lam = 10.0 * float(m.image_sigma[0]) ** 2
    ours = cs_baselines.cg_sense(m, 10.0, max_iter=200, tol=1e-7)
    app = sigpy.app.LinearLeastSquares(operator_linop(m), m.y.numpy(), lamda=lam, max_iter=200, tol=1e-12,
                                       show_pbar=False)
    np.testing.assert_allclose(ours, np.abs(app.run()), atol=1e-4 * float(ours.max()))
    residuals: list[torch.Tensor] = []
    op = m.operator()
    cs_baselines.conjugate_gradient(lambda v: op.adjoint(op.forward(v)) + lam * v, op.adjoint(m.y), 200,
                                    1e-5, residuals)
    assert float(residuals[-1][0]) <= 1e-5 < float(residuals[0][0])  # stopped at the tolerance
    assert len(residuals) < 40  # conjugate directions: 23 iterations here (steepest descent needs > 200)


def test_on_fully_sampled_noise_free_coils_every_baseline_gives_the_magnitude() -> None:
    x = torch.randn(2, 1, 20, 24, generator=torch.Generator().manual_seed(4), dtype=torch.complex64)
    maps = birdcage_sensitivities(6, 20, 24)  # sum_c |s_c|^2 = 1 everywhere: A^H A = I
    params = {**neutral_params(2, 20, 24), "sensitivities": maps.expand(2, -1, -1, -1)}
    params.pop("noise_sigma")
    m = Measurement.from_kspace(fft2c(maps * x), params, 0.0)  # no noise: every lam is 0
    assert m.n_coils == 6
    for name in CS:
        np.testing.assert_allclose(BASELINES[name](m), x[:, 0].abs().numpy(), rtol=1e-3, atol=1e-4,
                                   err_msg=name)


def _single_coil(ref: np.ndarray, sigma: float, seed: int) -> Measurement:
    x = torch.from_numpy(ref).to(torch.complex64)[:, None]
    g = torch.Generator().manual_seed(seed)
    noise = sigma / math.sqrt(2) * torch.complex(torch.randn(x.shape, generator=g),
                                                 torch.randn(x.shape, generator=g))
    params = neutral_params(x.shape[0], *x.shape[-2:])
    params.pop("noise_sigma")
    return Measurement.from_kspace(fft2c(x) + noise, params, sigma)


def test_on_one_fully_sampled_coil_the_baselines_reduce_to_known_images(colin: np.ndarray) -> None:
    ref = colin[1:, 40:104, 16:80]  # [1, 64, 64]
    m = _single_coil(ref, 0.1, 0)
    assert m.n_coils == 1 and m.mask is None
    degraded = ifft2c(m.y)[:, 0].abs().numpy()
    np.testing.assert_allclose(BASELINES["zero_filled_rss"](m), degraded, rtol=1e-5, atol=1e-6)
    lam = 30.0 * float(m.image_sigma[0]) ** 2  # A = F: x = F^H y / (1 + lam)
    np.testing.assert_allclose(BASELINES["cg_sense"](m, lam_factor=30.0), degraded / (1 + lam), rtol=1e-4,
                               atol=1e-5)
    noisy = ssim_volume(degraded, ref)
    for name in ("l1_wavelet", "tv_cs"):
        out = BASELINES[name](m, lam_factor=2.0)
        assert out.shape == ref.shape and out.dtype == np.float32
        assert ssim_volume(out, ref) > noisy + 0.1, name


def test_on_one_undersampled_coil_cs_removes_aliasing(colin: np.ndarray) -> None:
    ref = colin[1:, 40:136, 16:80]  # [1, 96, 64]
    x = torch.from_numpy(ref).to(torch.complex64)[:, None]
    m = _simulate(x, "noise", 2, espirit=False, snr_db=30.0, acceleration=2, center_fraction=0.16,
                  mask="random")
    assert m.n_coils == 1 and m.mask is not None
    zero_filled = BASELINES["zero_filled_rss"](m)
    np.testing.assert_allclose(zero_filled, m.magnitude(), rtol=1e-5, atol=1e-6)
    assert ssim_volume(BASELINES["tv_cs"](m, lam_factor=0.25), ref) > ssim_volume(zero_filled, ref) + 0.05


def test_the_cs_baselines_are_registered_and_import_no_diffusion_code() -> None:
    assert parse_baselines(",".join(CS)) == ["degraded", *CS]
    assert set(CS) <= set(parse_baselines("all"))
    assert not BASELINES["zero_filled_rss"].grid and len(BASELINES["l1_wavelet"].grid["lam_factor"]) == 6
    tree = ast.parse((REPO / "degradations" / "classical.py").read_text())
    modules = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    modules += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert modules and not [m for m in modules if m.split(".")[0] in ("diffusion", "lightning_modules")]


@pytest.mark.slow
def test_eight_coils_4x_espirit_cg_sense_beats_zero_filled_and_cs_beats_cg_sense(colin: np.ndarray) -> None:
    x = torch.from_numpy(colin).to(torch.complex64)[:, None]
    m = _simulate(x, "noise", 3, snr_db=30.0, acceleration=4, center_fraction=0.08, mask="equispaced",
                  coils=8)
    assert m.n_coils == 8 and float(m.mask[:, 0, :, 0].mean()) == pytest.approx(0.25, abs=0.02)
    val = _slices(m, slice(0, 1))
    test = _slices(m, slice(1, 2))
    val_ref, ref = colin[:1], colin[1:]
    tuned = {name: tune_baseline(BASELINES[name], {"val": (val, val_ref)}, ssim_volume).params
             for name in ("cg_sense", "l1_wavelet", "tv_cs")}
    scores = {name: _scores(BASELINES[name](test, **tuned.get(name, {})), ref) for name in CS}
    assert scores["cg_sense"][0] > scores["zero_filled_rss"][0] + 2.0  # PSNR (dB)
    assert scores["cg_sense"][1] > scores["zero_filled_rss"][1] + 0.1  # SSIM
    for name in ("l1_wavelet", "tv_cs"):
        assert scores[name][0] > scores["cg_sense"][0] and scores[name][1] > scores["cg_sense"][1], name
        wrong = _scores(BASELINES[name](test, lam_factor=100 * tuned[name]["lam_factor"]), ref)
        assert wrong[0] < scores[name][0] - 1.0 and wrong[1] < scores[name][1] - 0.05, name


def _slices(m: Measurement, sl: slice) -> Measurement:
    """The measurement of the slices `sl` (the same maps, mask and noise std)."""
    params = {k: v[sl] for k, v in m.params.items()}
    return Measurement(m.y[sl], params, m.noise_sigma[sl], m.noise_origin, m.b0_method, m.n_segments)


def _scores(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    return psnr_volume(pred, ref), ssim_volume(pred, ref)
