"""DSM and the supervised reconstruction loss: definitions on hand-computable nets, and a short real fit."""


import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import MNI, TINY_NET

from diffusion.losses import dsm_loss, supervised_loss
from diffusion.networks.ddpm import DDPM, DDPMConfig
from diffusion.sampling.sde import VPSDE

SDE = VPSDE()


pytestmark = pytest.mark.usefixtures("one_thread")


def zero_net(x, labels):
    return torch.zeros_like(x)


def mni_slices(n: int = 16, size: int = 32) -> torch.Tensor:
    """n axial slices of nilearn's MNI152 T1 template, area-downsampled to size^2, as (m, 0) 2-channel."""
    vol = np.asarray(nib.load(str(MNI)).dataobj, dtype=np.float32)  # [197, 233, 189], axial = last axis
    z = np.linspace(50, 140, n).round().astype(int)
    m = torch.from_numpy(vol[:, :, z]).permute(2, 0, 1)[:, None]  # [n, 1, X, Y]
    m = F.interpolate(m, size=(size, size), mode="area")
    m = m / torch.quantile(m.flatten(), 0.99)
    return torch.cat([m, torch.zeros_like(m)], dim=1)


def test_dsm_of_a_zero_net_is_mean_noise_power():
    x = torch.randn(5, 2, 8, 8)
    loss = dsm_loss(zero_net, SDE, x, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    torch.rand(5, generator=g)
    z = torch.randn(x.shape, generator=g)
    torch.testing.assert_close(loss, z.square().mean())


def test_dsm_likelihood_weighting_definition():
    x = torch.randn(4, 2, 8, 8)
    loss = dsm_loss(zero_net, SDE, x, likelihood_weighting=True, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    t = torch.rand(4, generator=g) * (1 - 1e-5) + 1e-5
    z = torch.randn(x.shape, generator=g)
    per = (z / SDE.std(t)[:, None, None, None]).square().flatten(1).mean(1) * SDE.beta(t)
    torch.testing.assert_close(loss, per.mean())
    summed = dsm_loss(zero_net, SDE, x, reduce_mean=False, generator=torch.Generator().manual_seed(1))
    mean = dsm_loss(zero_net, SDE, x, reduce_mean=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(summed, 0.5 * x[0].numel() * mean)


def test_dsm_is_zero_for_the_oracle_noise_predictor():
    """A net that returns the exact injected noise has zero DSM loss (sign and scaling of the score)."""
    x = torch.randn(3, 2, 8, 8)
    g = torch.Generator().manual_seed(4)
    t = torch.rand(3, generator=g) * (1 - 1e-5) + 1e-5
    z = torch.randn(x.shape, generator=g)
    loss = dsm_loss(lambda xt, labels: z, SDE, x, generator=torch.Generator().manual_seed(4))
    assert loss.item() < 1e-10 and t.shape == (3,)


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_supervised_loss_of_a_zero_net(kind):
    degraded, clean = torch.randn(4, 2, 8, 8), torch.randn(4, 2, 8, 8)
    loss = supervised_loss(zero_net, SDE, degraded, clean, t0_range=(0.1, 0.4), loss=kind,
                           generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t0 = torch.rand(4, generator=g) * 0.3 + 0.1
    z = torch.randn(degraded.shape, generator=g)
    a, s = SDE.alpha(t0)[:, None, None, None], SDE.std(t0)[:, None, None, None]
    x0_hat = (a * degraded + s * z) / a  # zero output: zero score, x0_hat = x_t0 / alpha
    expected = (x0_hat - clean).abs().mean() if kind == "l1" else (x0_hat - clean).square().mean()
    torch.testing.assert_close(loss, expected)


def test_supervised_loss_of_the_oracle_is_the_degradation_error():
    """Predicting the injected noise exactly recovers the degraded slice: loss = |degraded - clean|."""
    degraded, clean = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    g = torch.Generator().manual_seed(6)
    torch.rand(2, generator=g)
    z = torch.randn(degraded.shape, generator=g)
    loss = supervised_loss(lambda x, labels: z, SDE, degraded, clean, t0_range=(0.2, 0.2),
                           generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(loss, (degraded - clean).abs().mean())


def test_tweedie_and_t0_validation():
    x, t = torch.randn(2, 2, 4, 4), torch.tensor([0.1, 0.5])
    x0 = SDE.denoise(x, t, torch.zeros_like(x))
    torch.testing.assert_close(x0, x / SDE.alpha(t)[:, None, None, None])
    with pytest.raises(ValueError, match="t0_range"):
        supervised_loss(zero_net, SDE, x, x, t0_range=(0.5, 0.1))
    with pytest.raises(ValueError, match="'l3'"):
        supervised_loss(zero_net, SDE, x, x, loss="l3")


@pytest.mark.slow
def test_dsm_decreases_on_real_slices():
    torch.manual_seed(0)
    data = mni_slices(16, 32)
    net = DDPM(DDPMConfig(**{**TINY_NET, "attn_resolutions": (), "image_size": 32}, dropout=0.0))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)

    def held_out_loss():
        with torch.no_grad():
            return sum(dsm_loss(net, SDE, data, generator=torch.Generator().manual_seed(100 + i)).item()
                       for i in range(4)) / 4

    before = held_out_loss()
    for step in range(40):
        batch = data[torch.randperm(16)[:8]]
        loss = dsm_loss(net, SDE, batch, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_loss()
    print(f"held-out DSM {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before, (before, after)
