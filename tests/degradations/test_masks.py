"""Undersampling masks: fastMRI's line-mask conventions, SigPy's Poisson disc, the `UndersamplingMask`
step."""

import numpy as np
import pytest
import torch

from degradations.masks import UndersamplingMask, cartesian_mask, poisson_disc_mask

CASES = [(368, 4, 0.08, 0), (368, 4, 0.08, 7), (368, 8, 0.04, 1), (368, 8, 0.04, 42), (320, 4, 0.08, 3),
         (255, 3, 0.1, 5)]


def _reference(kind: str, n: int, acceleration: float, center_fraction: float, seed: int) -> np.ndarray:
    """fastMRI's rule as masks.py's docstring states it, transcribed literally, one line at a time."""
    rng = np.random.RandomState(seed)
    n_low = round(n * center_fraction)
    pad = (n - n_low + 1) // 2
    sampled = [pad <= i < pad + n_low for i in range(n)]
    if kind == "random":
        p = (n / acceleration - n_low) / (n - n_low)
        u = rng.uniform(size=n)
        for i in range(n):
            sampled[i] = sampled[i] or u[i] < p
    else:
        a = acceleration * (n_low - n) / (n_low * acceleration - n)
        offset = rng.randint(0, high=round(a))
        k = 0
        while offset + k * a < n - 1:
            sampled[round(offset + k * a)] = True
            k += 1
    return np.array(sampled)


@pytest.mark.parametrize("kind", ["random", "equispaced"])
@pytest.mark.parametrize(("n", "acceleration", "center_fraction", "seed"), CASES)
def test_cartesian_mask_follows_fastmri_rule(kind, n, acceleration, center_fraction, seed):
    mask = cartesian_mask(kind, n, acceleration, center_fraction, np.random.RandomState(seed))
    assert mask.dtype == bool and mask.shape == (n,)
    np.testing.assert_array_equal(mask, _reference(kind, n, acceleration, center_fraction, seed))


@pytest.mark.parametrize(("n", "acceleration", "center_fraction"),
                         [(368, 4, 0.08), (368, 8, 0.04), (255, 4, 0.08)])
@pytest.mark.parametrize("kind", ["random", "equispaced"])
def test_cartesian_mask_fraction_and_centre_block(kind, n, acceleration, center_fraction):
    masks = np.stack([cartesian_mask(kind, n, acceleration, center_fraction, np.random.RandomState(seed))
                      for seed in range(40)])
    fractions = masks.mean(axis=1)
    if kind == "equispaced":  # each mask within a few lines of 1/acceleration
        assert np.abs(fractions - 1 / acceleration).max() < 3 / n
    else:  # on average
        assert abs(fractions.mean() - 1 / acceleration) < 0.01
    # the lines every mask samples: exactly the centre block, contiguous, round(n * cf) lines, centred
    always = np.flatnonzero(masks.all(axis=0))
    assert always.size == round(n * center_fraction)
    assert np.array_equal(always, np.arange(always[0], always[-1] + 1))
    assert n // 2 in always and abs(always.mean() - n / 2) <= 0.5


def test_cartesian_mask_seeded_draws_repeat_and_differ():
    for kind in ("random", "equispaced"):
        a = cartesian_mask(kind, 368, 4, 0.08, np.random.RandomState(11))
        b = cartesian_mask(kind, 368, 4, 0.08, np.random.RandomState(11))
        np.testing.assert_array_equal(a, b)
        others = [cartesian_mask(kind, 368, 4, 0.08, np.random.RandomState(s)) for s in range(12, 20)]
        assert any(not np.array_equal(a, o) for o in others)


def test_acceleration_one_is_fully_sampled():
    for kind in ("random", "equispaced"):
        assert cartesian_mask(kind, 100, 1, 0.08, np.random.RandomState(0)).all()
    assert poisson_disc_mask(32, 24, 1, 8, 0).all()
    params = UndersamplingMask("poisson", 1).sample_params(2, 16, 12, torch.Generator().manual_seed(0))
    assert bool((params["mask"] == 1).all())


@pytest.mark.parametrize(("args", "name"), [
    (("random", 64, 0.5, 0.08), "acceleration"),
    (("random", 64, float("nan"), 0.08), "acceleration"),
    (("equispaced", 64, 4, 0.0), "center_fraction"),
    (("equispaced", 64, 4, 1.0), "center_fraction"),
    (("equispaced", 64, 4, 0.3), "center_fraction"),  # 19 centre lines >= 64 / 4
    (("radial", 64, 4, 0.08), "kind"),
])
def test_cartesian_mask_rejects_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        cartesian_mask(*args, rng=np.random.RandomState(0))


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"kind": "spiral", "acceleration": 4}, "kind"),
    ({"kind": "random", "acceleration": 0.9}, "acceleration"),
    ({"kind": "poisson", "acceleration": 4, "center_fraction": 1.5}, "center_fraction"),
])
def test_undersampling_mask_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        UndersamplingMask(**kwargs)


def test_poisson_disc_mask_fraction_calibration_and_seed():
    height, width, acceleration, calib = 96, 80, 4.0, 12
    mask = poisson_disc_mask(height, width, acceleration, calib, seed=3)
    assert mask.dtype == bool and mask.shape == (height, width)
    assert abs(height * width / mask.sum() - acceleration) < 0.1  # SigPy's tolerance on the acceleration
    r0, c0 = height // 2 - calib // 2, width // 2 - calib // 2
    assert mask[r0:r0 + calib, c0:c0 + calib].all()
    assert not mask.all(axis=1).any()  # a 2D pattern: no whole row sampled
    np.testing.assert_array_equal(mask, poisson_disc_mask(height, width, acceleration, calib, seed=3))
    assert not np.array_equal(mask, poisson_disc_mask(height, width, acceleration, calib, seed=4))


@pytest.mark.parametrize("kind", ["random", "equispaced"])
def test_undersampling_mask_step_draws_one_line_mask_per_slice_from_the_generator(kind):
    step = UndersamplingMask(kind, 4, 0.08)
    params = step.sample_params(3, 64, 40, torch.Generator().manual_seed(5))
    mask = params["mask"]
    assert mask.shape == (3, 1, 64, 40) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert bool((mask == mask[..., :1]).all())  # whole rows of H (readout along W)
    seeds = torch.randint(0, 2 ** 31 - 1, (3,), generator=torch.Generator().manual_seed(5)).tolist()
    for b, seed in enumerate(seeds):
        expected = cartesian_mask(kind, 64, 4, 0.08, np.random.RandomState(seed))
        np.testing.assert_array_equal(mask[b, 0, :, 0].numpy() > 0, expected)
    assert not torch.equal(mask[0], mask[1]) or not torch.equal(mask[1], mask[2])
    again = step.sample_params(3, 64, 40, torch.Generator().manual_seed(5))["mask"]
    assert torch.equal(mask, again)
    assert UndersamplingMask.kspace_weights(params) is mask
    assert UndersamplingMask.kspace_weights({"fwhm_px": torch.zeros(3)}) is None


def test_undersampling_mask_step_poisson_is_a_2d_pattern():
    step = UndersamplingMask("poisson", 3, 0.125)
    mask = step.sample_params(2, 64, 48, torch.Generator().manual_seed(0))["mask"]
    assert mask.shape == (2, 1, 64, 48) and mask.dtype == torch.float32
    assert not bool((mask == mask[..., :1]).all())
    calib = round(0.125 * 48)
    r0, c0 = 32 - calib // 2, 24 - calib // 2
    assert bool(mask[:, :, r0:r0 + calib, c0:c0 + calib].all())
    assert abs(64 * 48 / mask[0].sum().item() - 3) < 0.1
