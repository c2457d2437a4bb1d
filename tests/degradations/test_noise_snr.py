"""Complex Gaussian noise: the measured SNR on a real brain slice equals the target."""


import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import MNI

from degradations import ComplexGaussianNoise, fft2c, ifft2c, make_regime, signal_power, snr_db


@pytest.fixture(scope="module")
def brain_slice():
    """The middle axial slice of the MNI152 T1 template (real human MRI), complex [1, 1, 197, 233]."""
    vol = np.asarray(nib.load(str(MNI)).dataobj, dtype=np.float32)
    return torch.from_numpy(vol[:, :, vol.shape[2] // 2].copy()).to(torch.complex64)[None, None]


@pytest.mark.parametrize("target", [2.0, 5.0, 7.0])
def test_measured_snr_equals_target_on_a_real_slice(brain_slice, target):
    degradation = make_regime("noise", snr_db=target)
    x = brain_slice.expand(4, -1, -1, -1)  # four independent noise draws of the same slice
    y, params = degradation(x, torch.Generator().manual_seed(int(target)))
    noise = y - fft2c(x)
    measured = snr_db(x, (noise.abs() ** 2).mean(dim=(1, 2, 3)))
    assert measured.mean().item() == pytest.approx(target, abs=0.3)
    torch.testing.assert_close(params["snr_db"], torch.full((4,), target))


def test_snr_is_set_against_the_image_entering_the_noise_stage(brain_slice):
    degradation = make_regime("noise_blur_t2star_b0", snr_db=4.0)
    x = brain_slice.expand(3, -1, -1, -1)
    g = torch.Generator().manual_seed(11)
    params = degradation.sample_params(x, g)
    a_x = degradation.operator(params).forward(x)
    noise = degradation.apply(x, params, g) - a_x
    measured = snr_db(ifft2c(a_x), (noise.abs() ** 2).mean(dim=(1, 2, 3)))
    assert measured.mean().item() == pytest.approx(4.0, abs=0.3)


def test_noise_is_circular_with_half_the_variance_in_each_part(brain_slice):
    k = torch.zeros(1, 1, 256, 256, dtype=torch.complex64)
    n = ComplexGaussianNoise.draw(k, torch.tensor([2.0]), torch.Generator().manual_seed(0))
    assert (n.abs() ** 2).mean().item() == pytest.approx(4.0, rel=0.02)   # sigma^2 per complex sample
    assert n.real.var().item() == pytest.approx(2.0, rel=0.02)            # sigma^2 / 2 in each part
    assert n.imag.var().item() == pytest.approx(2.0, rel=0.02)
    assert abs((n.real * n.imag).mean().item()) < 0.05                     # uncorrelated parts
    assert abs(n.mean().item()) < 0.05


def test_empty_slice_takes_the_power_of_its_batch_or_the_given_one(brain_slice):
    x = torch.cat([brain_slice, torch.zeros_like(brain_slice)])
    sigma = ComplexGaussianNoise.sigma_for(x, torch.tensor([5.0, 5.0]))
    assert sigma[1].item() == pytest.approx(sigma[0].item())  # not silently noise-free
    given = ComplexGaussianNoise.sigma_for(x, torch.tensor([5.0, 5.0]), torch.tensor([100.0, 100.0]))
    torch.testing.assert_close(given, torch.full((2,), float(np.sqrt(100.0 / 10 ** 0.5))))
    assert signal_power(brain_slice).item() > 0
