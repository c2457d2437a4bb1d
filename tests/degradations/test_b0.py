"""B0 off-resonance: field maps, the exact per-column model and its time-segmentation approximation."""

import math

import pytest
import torch

from degradations import (
    B0PhaseCorruption,
    LowFieldDegradation,
    OffResonanceEncoding,
    fft2c,
    ifft2c,
    random_b0_map,
    sample_times_ms,
)

H, W = 24, 32
READOUT = torch.tensor([12.0, 8.0])
TE = torch.tensor([20.0, 5.0])


@pytest.fixture(scope="module")
def field():
    return random_b0_map(torch.tensor([60.0, 30.0]), H, W, torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 1, H, W, dtype=torch.complex128, generator=torch.Generator().manual_seed(2))


def per_sample_sum(x, field_hz, readout, te):
    """The signal equation evaluated sample by sample: column kx of fft2c(x * exp(-i 2 pi Df t(kx)))."""
    t = sample_times_ms(readout.double(), te.double(), x.shape[-1], torch.float64)
    k = torch.zeros_like(x)
    for j in range(x.shape[-1]):
        phase = torch.exp(-2j * math.pi * 1e-3 * field_hz.double() * t[:, j, None, None, None])
        k[..., j] = fft2c(x * phase)[..., j]
    return k


def test_field_map_is_smooth_and_scaled_to_its_maximum(field):
    torch.testing.assert_close(field.abs().amax(dim=(1, 2, 3)), torch.tensor([60.0, 30.0]))
    # smooth: a cubic on [-1, 1] has |p'| <= 9 max|p| (Markov), so neighbours differ by <= 18 max / (n - 1)
    peak = torch.tensor([60.0, 30.0])[:, None, None, None]
    assert torch.all(field.diff(dim=-1).abs() <= 18 * peak / (W - 1) + 1e-4)
    assert torch.all(field.diff(dim=-2).abs() <= 18 * peak / (H - 1) + 1e-4)
    assert field.diff(dim=-1).abs().max() > 0  # and not constant
    again = random_b0_map(torch.tensor([60.0, 30.0]), H, W, torch.Generator().manual_seed(1))
    torch.testing.assert_close(again, field)


@pytest.mark.parametrize("method", ["segmented", "exact"])
def test_zero_field_map_is_the_identity(image, method):
    op = OffResonanceEncoding(torch.zeros(2, 1, H, W), READOUT, TE, method)
    torch.testing.assert_close(op.forward(image), fft2c(image))
    torch.testing.assert_close(op.adjoint(image), ifft2c(image))
    b0_only = LowFieldDegradation("b0", b0=B0PhaseCorruption(b0_max_hz=0.0, method=method))
    params = b0_only.sample_params(image, torch.Generator().manual_seed(0))
    assert bool((params["b0_map_hz"] == 0).all())
    torch.testing.assert_close(b0_only.apply(image, params), fft2c(image))


def test_exact_method_is_the_per_sample_sum(image, field):
    expected = per_sample_sum(image, field, READOUT, TE)
    torch.testing.assert_close(OffResonanceEncoding(field, READOUT, TE, "exact").forward(image), expected,
                               rtol=1e-10, atol=1e-10)


def test_a_uniform_offset_multiplies_each_column_by_its_accrued_phase(image):
    offset = torch.full((2, 1, H, W), 25.0)
    k = OffResonanceEncoding(offset, READOUT, TE, "exact").forward(image)
    t = sample_times_ms(READOUT.double(), TE.double(), W, torch.float64)
    phase = torch.exp(-2j * math.pi * 1e-3 * 25.0 * t)[:, None, None, :]
    torch.testing.assert_close(k, fft2c(image) * phase, rtol=1e-10, atol=1e-10)


def test_time_segmentation_matches_the_per_sample_sum(image, field):
    """Tolerance: relative L2 error < 2e-3 with the automatic L (23 segments for 60 Hz x 12 ms, W = 32);
    the error falls as L grows and vanishes at L = W."""
    expected = per_sample_sum(image, field, READOUT, TE)

    def error(n_segments):
        op = OffResonanceEncoding(field, READOUT, TE, "segmented", n_segments)
        return ((op.forward(image) - expected).norm() / expected.norm()).item(), op.n_segments

    auto_error, auto_segments = error(None)
    assert auto_segments == 23
    assert auto_error < 2e-3
    errors = [error(n)[0] for n in (4, 8, 16)]
    assert errors[0] > errors[1] > errors[2] > auto_error
    assert error(W)[0] < 1e-10


def test_phase_accrued_before_the_readout_keeps_the_magnitude(image, field):
    """With an instantaneous readout the field only adds an image-domain phase exp(-i 2 pi Df TE)."""
    for method in ("segmented", "exact"):
        op = OffResonanceEncoding(field, torch.zeros(2), TE, method)
        out = ifft2c(op.forward(image))
        torch.testing.assert_close(out.abs(), image.abs())
        phase = torch.exp(-2j * math.pi * 1e-3 * field.double() * TE.double()[:, None, None, None])
        torch.testing.assert_close(out, image * phase)


def test_readout_phase_displaces_pixels_along_the_readout():
    """A uniform offset Df shifts the image by Df * readout pixels along W (and not along H)."""
    x = torch.zeros(1, 1, 16, 32, dtype=torch.complex128)
    x[..., 8, 10] = 1.0
    readout_ms = 20.0
    offset_hz = 100.0  # 100 Hz x 20 ms = 2 pixels
    op = OffResonanceEncoding(torch.full((1, 1, 16, 32), offset_hz), torch.tensor([readout_ms]),
                              torch.tensor([0.0]), "exact")
    out = ifft2c(op.forward(x)).abs()[0, 0]
    assert divmod(int(out.argmax()), 32) == (8, 10 + 2)  # k-space phase e^{-i 2 pi kx s / W}: shift by +s


@pytest.mark.parametrize("n_segments", [None, 2, 5])
def test_one_readout_sample_is_segmented_exactly(n_segments):
    """W = 1: the only readout sample has one time, so one segment time (its own) is exact (forward and
    adjoint), whatever n_segments asks for."""
    field = random_b0_map(torch.tensor([60.0, 30.0]), H, 1, torch.Generator().manual_seed(3))
    x = torch.randn(2, 1, H, 1, dtype=torch.complex128, generator=torch.Generator().manual_seed(4))
    op = OffResonanceEncoding(field, READOUT, TE, "segmented", n_segments)
    assert op.n_segments == 1
    exact = OffResonanceEncoding(field, READOUT, TE, "exact")
    torch.testing.assert_close(op.forward(x), per_sample_sum(x, field, READOUT, TE), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(op.adjoint(x), exact.adjoint(x), rtol=1e-10, atol=1e-10)


def test_fewer_than_two_segments_are_refused_when_the_corruption_is_built():
    with pytest.raises(ValueError, match="n_segments must be >= 2"):
        B0PhaseCorruption(n_segments=1)
