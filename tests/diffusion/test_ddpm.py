"""The DDPM U-Net: score_sde's module layout and parameter counts, the forward conventions, and running at
any H x W (non-square multiples of the size multiple as they are, other sizes padded and cropped back)."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import REPO, SCORE_SDE_FIXTURE, SCORE_SDE_NET, TINY_NET

from diffusion.checkpoint import load_score_sde_checkpoint
from diffusion.networks.ddpm import DDPM, AttnBlock, DDPMConfig
from diffusion.sampling.sde import pad_to_multiple
from lfmri_utils.errors import InputError

#: three levels (size multiple 4), attention at the level that is 8 px wide for a 16 px training crop
THREE_LEVELS = {**TINY_NET, "ch_mult": (1, 2, 2), "dropout": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("channels, expected", [(2, 34_425_602), (1, 34_423_297)])
def test_34m_parameter_count(channels, expected):
    with torch.device("meta"):
        net = DDPM(DDPMConfig(nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                              image_size=256, num_channels=channels))
    assert n_params(net) == expected
    # 256 -> 128 -> 64 -> 32: no level is 16 px wide, so only the middle attention block exists
    assert sum(isinstance(m, AttnBlock) for m in net.all_modules) == 1


def test_34m_yaml_config_builds_the_34m_net():
    init_args = yaml.safe_load((REPO / "configs/model/ddpm_34m.yaml").read_text())["model"]["init_args"]
    with torch.device("meta"):
        net = DDPM(DDPMConfig(**init_args["net"]))
    assert n_params(net) == 34_425_602


def test_state_dict_keys_and_shapes_match_the_score_sde_fixture():
    ckpt = torch.load(SCORE_SDE_FIXTURE / "checkpoint.pth", map_location="cpu", weights_only=True)
    with torch.device("meta"):
        net = DDPM(DDPMConfig(**SCORE_SDE_NET))
    ours = {f"module.{k}": tuple(v.shape) for k, v in net.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
    assert list(ours) == list(theirs)  # same order: parameters() order = EMA shadow order
    assert ours == theirs


def test_forward_shape_and_time_dependence():
    torch.manual_seed(0)
    net = DDPM(DDPMConfig(**TINY_NET, dropout=0.0))
    for p in net.parameters():  # DDPM zero-inits the last convs: perturb so the output depends on inputs
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 2, 16, 16)
    out = net(x, torch.tensor([0.0, 500.0, 999.0]))
    assert out.shape == x.shape
    out2 = net(x, torch.tensor([10.0, 500.0, 999.0]))
    assert not torch.allclose(out[0], out2[0]) and torch.allclose(out[1:], out2[1:], atol=1e-6)


def test_uncentered_input_is_mapped_to_minus_one_one():
    torch.manual_seed(0)
    a = DDPM(DDPMConfig(**TINY_NET, centered=False))
    b = DDPM(DDPMConfig(**TINY_NET, centered=True))
    b.load_state_dict(a.state_dict())
    for p in a.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    b.load_state_dict(a.state_dict())
    x, labels = torch.rand(2, 2, 16, 16), torch.tensor([3.0, 700.0])
    a.eval(), b.eval()
    torch.testing.assert_close(a(x, labels), b(2 * x - 1, labels))


def test_gradient_checkpointing_gives_identical_outputs_and_gradients():
    torch.manual_seed(0)
    plain = DDPM(DDPMConfig(**TINY_NET, dropout=0.0))
    ckpt = DDPM(DDPMConfig(**TINY_NET, dropout=0.0), grad_checkpointing=True)
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
    net = DDPM(DDPMConfig(**TINY_NET))
    cfg = net.config.score_sde_config()
    assert cfg["data"] == {"image_size": 16, "num_channels": 2, "centered": True}
    assert cfg["model"]["name"] == "ddpm" and cfg["model"]["nf"] == 16


def test_the_config_round_trips_through_score_sde_layout_and_checks_its_fields():
    config = DDPMConfig(**TINY_NET, dropout=0.0, sigma_max=378.0, centered=False)
    assert DDPMConfig.from_score_sde(config.score_sde_config()) == config
    assert DDPMConfig.from_score_sde({"model": {"nf": 64}}) == DDPMConfig(nf=64)  # the rest: defaults
    with pytest.raises(InputError, match=r"^num_groups must divide the channel counts"):
        DDPMConfig(**{**TINY_NET, "num_groups": 3})
    with pytest.raises(InputError, match=r"^attn_resolutions must be a list of integers >= 1"):
        DDPMConfig(**{**TINY_NET, "attn_resolutions": (0,)})


def test_bad_nonlinearity_is_rejected():
    with pytest.raises(ValueError, match="nonlinearity"):
        DDPM(DDPMConfig(**TINY_NET, nonlinearity="gelu"))


def _perturbed(net: DDPM) -> DDPM:
    """DDPM zero-inits the last convs: perturb every weight so the output depends on the input."""
    torch.manual_seed(0)
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return net.eval()


def test_size_multiple_is_two_to_the_number_of_downsamplings():
    assert DDPM(DDPMConfig(**TINY_NET)).size_multiple == 2
    assert DDPM(DDPMConfig(**THREE_LEVELS)).size_multiple == 4
    with torch.device("meta"):
        assert DDPM(DDPMConfig(nf=128, ch_mult=(1, 2, 2, 2), image_size=256)).size_multiple == 8


def test_the_unet_runs_on_non_square_multiples_with_its_construction_time_attention():
    torch.manual_seed(0)
    net = _perturbed(DDPM(DDPMConfig(**THREE_LEVELS)))
    assert sum(isinstance(m, AttnBlock) for m in net.all_modules) == 3  # down and up at 8 px, middle
    x, labels = torch.randn(2, 2, 24, 40), torch.tensor([5.0, 800.0])
    with torch.no_grad():
        out = net.unet(x, labels)
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert torch.equal(net(x, labels), out)  # at a multiple, forward is the U-Net itself
        # the batch elements stay independent at a non-square size
        torch.testing.assert_close(net(x[1:], labels[1:]), out[1:], rtol=1e-4, atol=1e-5)


def test_other_sizes_are_padded_bottom_right_by_reflection_and_cropped_back():
    net = _perturbed(DDPM(DDPMConfig(**THREE_LEVELS)))
    x, labels = torch.randn(2, 2, 21, 37), torch.tensor([5.0, 800.0])
    with torch.no_grad():
        out = net(x, labels)
        assert out.shape == x.shape
        padded = F.pad(F.pad(x, (0, 3, 0, 0), mode="reflect"), (0, 0, 0, 3), mode="reflect")  # 24 x 40
        assert torch.equal(out, net.unet(padded, labels)[..., :21, :37])
    with pytest.raises(ValueError, match=r"multiples of 4, got \(21, 37\)"):
        net.unet(x, labels)


def test_attention_over_a_non_square_map_is_softmax_attention_over_its_pixels():
    torch.manual_seed(0)
    block = AttnBlock(8, num_groups=4)
    for p in block.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 8, 3, 5)
    h = block.GroupNorm_0(x).flatten(2)  # [B, C, HW], pixels in row-major order

    def nin(m, features):
        return torch.einsum("bcn,co->bon", features, m.W) + m.b[:, None]

    q, k, v = (nin(m, h) for m in (block.NIN_0, block.NIN_1, block.NIN_2))
    weights = torch.softmax(torch.einsum("bcn,bcm->bnm", q, k) / 8**0.5, dim=-1)
    expected = x + nin(block.NIN_3, torch.einsum("bnm,bcm->bcn", weights, v)).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_pad_to_multiple_is_the_identity_at_multiples_and_crops_back_otherwise():
    seen = []

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape[-2:]))
        return x * 2 + t[:, None, None, None]

    wrapped, t = pad_to_multiple(fn, 8), torch.tensor([0.5])
    x = torch.randn(1, 2, 16, 24)
    assert torch.equal(wrapped(x, t), fn(x, t)) and seen[0] == (16, 24)
    x = torch.randn(1, 2, 13, 19)
    torch.testing.assert_close(wrapped(x, t), fn(x, t), rtol=0, atol=0)
    assert seen[-2] == (16, 24)
    # an axis shorter than its pad is replicated (reflection needs pad < size)
    seen.clear()
    x = torch.randn(1, 2, 1, 3)
    torch.testing.assert_close(wrapped(x, t), fn(x, t), rtol=0, atol=0)
    assert seen[0] == (8, 8)
    with pytest.raises(ValueError, match="multiple"):
        pad_to_multiple(fn, 0)


def test_score_sde_fixture_outputs_are_reproduced_through_the_padding_forward():
    io = torch.load(SCORE_SDE_FIXTURE / "io.pt", map_location="cpu", weights_only=True)
    config = json.loads((SCORE_SDE_FIXTURE / "config.json").read_text())
    net = load_score_sde_checkpoint(SCORE_SDE_FIXTURE / "checkpoint.pth", config, weights="ema")
    with torch.no_grad():
        out = net(io["x"], io["labels"])
        assert torch.equal(out, net.unet(io["x"], io["labels"]))  # 16 x 16: no padding at all
    assert (out - io["out_ema_model"]).abs().max().item() < 1e-5
    with torch.no_grad():  # the same network at a native, non-multiple size
        assert net(io["x"][..., :15, :13], io["labels"]).shape == (4, 2, 15, 13)
