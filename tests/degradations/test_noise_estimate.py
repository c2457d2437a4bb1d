"""The blind k-space noise estimate recovers the noise std of degraded real MRI slices in every regime."""

import importlib.resources

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import MNI

from degradations import REGIMES, ForwardOperator, estimate_noise_sigma, fft2c, make_regime

ANATOMICAL = importlib.resources.files("nibabel") / "tests/data/anatomical.nii"
SNRS_DB = (2.0, 5.0, 10.0, 20.0)

pytestmark = pytest.mark.usefixtures("one_thread")


def _normalised(slab: np.ndarray) -> torch.Tensor:
    """``[S, H, W]`` -> complex ``[S, 1, H, W]``, each slice divided by its 99.5th percentile."""
    scale = np.percentile(slab.reshape(slab.shape[0], -1), 99.5, axis=1)
    return torch.from_numpy(slab / scale[:, None, None])[:, None].to(torch.complex64)


@pytest.fixture(scope="module")
def mni_slices() -> list[torch.Tensor]:
    """Native-resolution slices of the MNI152 T1 template: three axial [3,1,197,233], two sagittal
    [2,1,233,189]."""
    volume = np.asarray(nib.load(str(MNI)).dataobj, dtype=np.float32)
    axial = np.moveaxis(volume[:, :, [60, 95, 130]], 2, 0)
    sagittal = volume[[60, 130]]
    return [_normalised(axial), _normalised(sagittal)]


@pytest.fixture(scope="module")
def anatomical_slices() -> torch.Tensor:
    """Four 33x41 slices of nibabel's real T1 acquisition (which holds noise of its own), [4,1,33,41]."""
    volume = np.asarray(nib.load(str(ANATOMICAL)).dataobj, dtype=np.float32)
    return _normalised(np.moveaxis(volume[:, :, [6, 10, 14, 18]], 2, 0))


def _relative_errors(batches: list[torch.Tensor], regime: str, snrs: tuple[float, ...],
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """|estimate / true - 1| with the regime's operator and blind, over all slices and SNRs."""
    generator = torch.Generator().manual_seed(seed)
    with_operator, blind = [], []
    for snr in snrs:
        degradation = make_regime(regime, snr_db=snr)
        for x in batches:
            y, params = degradation(x, generator)
            sigma = params["noise_sigma"]
            with_operator.append(estimate_noise_sigma(y, degradation.operator(params)) / sigma - 1)
            blind.append(estimate_noise_sigma(y) / sigma - 1)
    return torch.cat(with_operator).abs(), torch.cat(blind).abs()


@pytest.mark.parametrize("regime", REGIMES)
def test_within_ten_percent_on_real_slices_at_2_to_20_db(mni_slices, regime):
    with_operator, blind = _relative_errors(mni_slices, regime, SNRS_DB, seed=REGIMES.index(regime))
    assert with_operator.max().item() < 0.10
    assert blind.max().item() < 0.10


@pytest.mark.parametrize("regime", REGIMES)
def test_small_real_acquisition_unbiased_up_to_10_db(anatomical_slices, regime):
    # a 33x41 slice has ~450 samples in the band: ~3 % std per estimate, so the bound is on the mean; at 20 dB
    # the slices' own noise (about 0.8 of the added noise) is measured too and is not tested
    with_operator, _ = _relative_errors([anatomical_slices], regime, (2.0, 5.0, 10.0), seed=7)
    assert with_operator.mean().item() < 0.05
    assert with_operator.max().item() < 0.15


def test_pure_noise_gives_its_std():
    generator = torch.Generator().manual_seed(0)
    noise = 0.7 * torch.randn(3, 1, 128, 128, dtype=torch.complex64, generator=generator)
    sigma = estimate_noise_sigma(noise)
    assert sigma.dtype == torch.float32 and sigma.shape == (3,)
    torch.testing.assert_close(sigma, torch.full((3,), 0.7), rtol=0.05, atol=0)


def test_scales_with_the_data_and_neutral_operator_changes_nothing(mni_slices):
    x = mni_slices[0]
    y = fft2c(x) + 0.05 * torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    sigma = estimate_noise_sigma(y)
    torch.testing.assert_close(estimate_noise_sigma(3.0 * y), 3.0 * sigma)
    torch.testing.assert_close(estimate_noise_sigma(y, ForwardOperator()), sigma)


def test_empty_slice_raises():
    with pytest.raises(ValueError, match="empty"):
        estimate_noise_sigma(torch.zeros(1, 1, 16, 16, dtype=torch.complex64))
    y = torch.randn(3, 1, 16, 16, dtype=torch.complex64, generator=torch.Generator().manual_seed(2))
    y[1] = 0
    with pytest.raises(ValueError, match=r"slice\(s\) \[1\].*empty"):
        estimate_noise_sigma(y)


@pytest.mark.parametrize("bad", [torch.ones(1, 1, 8, 8), torch.ones(1, 8, 8, dtype=torch.complex64),
                                 torch.full((1, 1, 8, 8), complex(float("nan"), 0.0)),
                                 torch.full((1, 2, 8, 8), complex(float("nan"), 0.0))])
def test_invalid_input_raises(bad):
    with pytest.raises(ValueError):
        estimate_noise_sigma(bad)
