"""The DDPM U-Net: score_sde's module layout and parameter counts, and the forward conventions."""

from pathlib import Path

import pytest
import torch
import yaml

from lightning_modules.ddpm import DDPM, AttnBlock
from lightning_modules.module import NET_ARGS

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "score_sde_tiny"  # copy of shared/fixtures
ROOT = Path(__file__).resolve().parents[2]
TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16, num_groups=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("channels, expected", [(2, 34_425_602), (1, 34_423_297)])
def test_34m_parameter_count(channels, expected):
    with torch.device("meta"):
        net = DDPM(nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), image_size=256,
                   num_channels=channels)
    assert n_params(net) == expected
    # 256 -> 128 -> 64 -> 32: no level is 16 px wide, so only the middle attention block exists
    assert sum(isinstance(m, AttnBlock) for m in net.all_modules) == 1


def test_34m_yaml_config_builds_the_34m_net():
    init_args = yaml.safe_load((ROOT / "configs/model/ddpm_34m.yaml").read_text())["init_args"]
    with torch.device("meta"):
        net = DDPM(**{k: init_args[k] for k in NET_ARGS if k in init_args})
    assert n_params(net) == 34_425_602


def test_state_dict_keys_and_shapes_match_the_score_sde_fixture():
    ckpt = torch.load(FIXTURE / "checkpoint.pth", map_location="cpu", weights_only=True)
    with torch.device("meta"):
        net = DDPM(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16)
    ours = {f"module.{k}": tuple(v.shape) for k, v in net.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
    assert list(ours) == list(theirs)  # same order: parameters() order = EMA shadow order
    assert ours == theirs


def test_forward_shape_and_time_dependence():
    torch.manual_seed(0)
    net = DDPM(**TINY, dropout=0.0)
    for p in net.parameters():  # DDPM zero-inits the last convs: perturb so the output depends on inputs
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 2, 16, 16)
    out = net(x, torch.tensor([0.0, 500.0, 999.0]))
    assert out.shape == x.shape
    out2 = net(x, torch.tensor([10.0, 500.0, 999.0]))
    assert not torch.allclose(out[0], out2[0]) and torch.allclose(out[1:], out2[1:], atol=1e-6)


def test_uncentered_input_is_mapped_to_minus_one_one():
    torch.manual_seed(0)
    a = DDPM(**TINY, centered=False)
    b = DDPM(**TINY, centered=True)
    b.load_state_dict(a.state_dict())
    for p in a.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    b.load_state_dict(a.state_dict())
    x, labels = torch.rand(2, 2, 16, 16), torch.tensor([3.0, 700.0])
    a.eval(), b.eval()
    torch.testing.assert_close(a(x, labels), b(2 * x - 1, labels))


def test_gradient_checkpointing_gives_identical_outputs_and_gradients():
    torch.manual_seed(0)
    plain = DDPM(**TINY, dropout=0.0)
    ckpt = DDPM(**TINY, dropout=0.0, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, labels = torch.randn(2, 2, 16, 16), torch.tensor([1.0, 600.0])
    grads = []
    for net in (plain, ckpt):
        net.train()
        net(x, labels).square().sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for g1, g2 in zip(*grads, strict=True):
        torch.testing.assert_close(g1, g2)


def test_config_round_trips_through_score_sde_layout():
    net = DDPM(**TINY)
    cfg = net.score_sde_config()
    assert cfg["data"] == {"image_size": 16, "num_channels": 2, "centered": True}
    assert cfg["model"]["name"] == "ddpm" and cfg["model"]["nf"] == 16


def test_bad_nonlinearity_is_rejected():
    with pytest.raises(ValueError, match="nonlinearity"):
        DDPM(**TINY, nonlinearity="gelu")
