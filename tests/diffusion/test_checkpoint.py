"""score_sde checkpoint import/export against the real-format fixture (outputs recorded from score_sde)."""

import json
from pathlib import Path

import pytest
import torch

from diffusion.checkpoint import (
    CheckpointError,
    export_score_sde_checkpoint,
    load_score_sde_checkpoint,
    read_ddpm_config,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "score_sde_tiny"  # copy of shared/fixtures
CKPT, CONFIG = FIXTURE / "checkpoint.pth", FIXTURE / "config.json"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def io():
    return torch.load(FIXTURE / "io.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def raw():
    return torch.load(CKPT, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("weights, key", [("model", "out_model"), ("ema", "out_ema_model")])
def test_fixture_outputs_are_reproduced(io, weights, key):
    net = load_score_sde_checkpoint(CKPT, json.loads(CONFIG.read_text()), weights=weights)
    assert not net.training
    with torch.no_grad():
        out = net(io["x"], io["labels"])
    torch.testing.assert_close(io["labels"], io["t"] * 999)
    assert (out - io[key]).abs().max().item() < 1e-5


def test_ema_and_model_weights_differ_and_are_the_files(raw):
    ema = load_score_sde_checkpoint(CKPT, CONFIG, weights="ema")
    model = load_score_sde_checkpoint(CKPT, CONFIG, weights="model")
    for p, s in zip(ema.parameters(), raw["ema"]["shadow_params"], strict=True):
        assert torch.equal(p, s)
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw["model"][f"module.{k}"])
    assert not all(torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters(), strict=True))


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_missing_key_error_names_file_and_key(raw, tmp_path):
    bad = dict(raw, model={k: v for k, v in raw["model"].items() if k != "module.all_modules.3.Conv_0.bias"})
    path = _save(bad, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError) as err:
        load_score_sde_checkpoint(path, CONFIG, weights="model")
    msg = str(err.value)
    assert "missing.pth" in msg and "first missing key 'module.all_modules.3.Conv_0.bias'" in msg
    assert "\n" not in msg


def test_unexpected_key_error(raw, tmp_path):
    bad = dict(raw, model={**raw["model"], "module.all_modules.99.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected.pth.*key 'module.all_modules.99.weight'"):
        load_score_sde_checkpoint(_save(bad, tmp_path / "unexpected.pth"), CONFIG)


def test_shape_mismatch_error_gives_both_shapes():
    config = json.loads(CONFIG.read_text())
    config["data"]["num_channels"] = 1
    with pytest.raises(CheckpointError) as err:
        load_score_sde_checkpoint(CKPT, config)
    msg = str(err.value)
    assert "'module.all_modules.2.weight'" in msg and "(32, 2, 3, 3)" in msg and "(32, 1, 3, 3)" in msg


def test_wrong_architecture_reports_the_first_difference():
    config = json.loads(CONFIG.read_text())
    config["model"]["num_res_blocks"] = 2
    with pytest.raises(CheckpointError, match="checkpoint.pth: checkpoint does not fit the DDPM config"):
        load_score_sde_checkpoint(CKPT, config)


def test_ema_length_mismatch(raw, tmp_path):
    bad = dict(raw, ema=dict(raw["ema"], shadow_params=raw["ema"]["shadow_params"][:-1]))
    with pytest.raises(CheckpointError, match="the EMA has 133 shadow tensors"):
        load_score_sde_checkpoint(_save(bad, tmp_path / "ema.pth"), CONFIG, weights="ema")
    # the model weights of the same file still load
    load_score_sde_checkpoint(tmp_path / "ema.pth", CONFIG, weights="model")


@pytest.mark.parametrize("content", [b"this is not a checkpoint\n", b""])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="notes.pth: not a PyTorch checkpoint"):
        load_score_sde_checkpoint(path, CONFIG)


def test_other_objects_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="not a score_sde checkpoint"):
        load_score_sde_checkpoint(_save([1, 2], tmp_path / "list.pth"), CONFIG)
    with pytest.raises(CheckpointError, match="d.pth: the state dict is neither a score_sde DDPM"):
        load_score_sde_checkpoint(_save({"weights": torch.zeros(2)}, tmp_path / "d.pth"), CONFIG)
    with pytest.raises(CheckpointError, match="o.pth: not a score_sde checkpoint"):
        load_score_sde_checkpoint(_save({"weights": [1, 2]}, tmp_path / "o.pth"), CONFIG)
    lightning_like = {"state_dict": {}, "pytorch-lightning_version": "2.6.6"}
    with pytest.raises(CheckpointError, match="Lightning checkpoint"):
        load_score_sde_checkpoint(_save(lightning_like, tmp_path / "l.ckpt"), CONFIG)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_score_sde_checkpoint(tmp_path / "absent.pth", CONFIG)


def test_config_errors():
    with pytest.raises(CheckpointError, match="config lacks nf"):
        read_ddpm_config({"model": {"ch_mult": [1]}, "data": {}})
    with pytest.raises(CheckpointError, match="'ncsnpp'"):
        read_ddpm_config({"model": {"name": "ncsnpp"}, "data": {}})
    complete = {"model": {"nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
                          "num_groups": 4}, "data": {"image_size": 16, "num_channels": 2, "centered": True}}
    assert read_ddpm_config(complete).ch_mult == (1, 2)
    complete["model"]["num_groups"] = 3  # a value DDPMConfig refuses: still one CheckpointError line
    with pytest.raises(CheckpointError, match=r"^the score_sde config: num_groups must divide .*\[8, 16\]"):
        read_ddpm_config(complete)


def test_channel_adaptation_is_exact_on_its_embedding(io):
    two = load_score_sde_checkpoint(CKPT, CONFIG)
    one = load_score_sde_checkpoint(CKPT, CONFIG, adapt_channels=1)
    assert one.num_channels == 1 and one.all_modules[2].weight.shape == (32, 1, 3, 3)
    m, labels = io["x"][:, :1], io["labels"]
    with torch.no_grad():
        # 2 -> 1: a real image m is the complex image (m, 0)
        torch.testing.assert_close(one(m, labels), two(torch.cat([m, torch.zeros_like(m)], 1), labels)[:, :1])
    assert one.config.score_sde_config()["data"]["num_channels"] == 1


def test_one_to_two_channels(io, tmp_path):
    one = load_score_sde_checkpoint(CKPT, CONFIG, adapt_channels=1)
    export_score_sde_checkpoint(one, tmp_path / "one.pth", config_path=tmp_path / "one.json")
    two = load_score_sde_checkpoint(tmp_path / "one.pth", tmp_path / "one.json", adapt_channels=2)
    m, labels = io["x"][:, :1], io["labels"]
    with torch.no_grad():
        ref = one(m, labels)
        torch.testing.assert_close(two(torch.cat([m, m], 1), labels), torch.cat([ref, ref], 1))


def test_export_round_trip(io, raw, tmp_path):
    model = load_score_sde_checkpoint(CKPT, CONFIG, weights="model")
    ema = load_score_sde_checkpoint(CKPT, CONFIG, weights="ema")
    out = tmp_path / "sub" / "exported.pth"
    export_score_sde_checkpoint(model, out, ema_params=list(ema.parameters()), step=1234,
                                config_path=tmp_path / "sub" / "exported.json")
    assert sorted(p.name for p in out.parent.iterdir()) == ["exported.json", "exported.pth"]  # no temp files
    blob = torch.load(out, map_location="cpu", weights_only=True)
    assert set(blob) == {"model", "ema", "optimizer", "step"} and blob["step"] == 1234
    assert list(blob["model"]) == list(raw["model"]) and blob["model"]["module.sigmas"].dtype == torch.float64
    assert set(blob["ema"]) == {"decay", "num_updates", "shadow_params"}
    torch.optim.Adam(model.parameters()).load_state_dict(blob["optimizer"])  # score_sde can resume
    for weights, key in (("model", "out_model"), ("ema", "out_ema_model")):
        net = load_score_sde_checkpoint(out, tmp_path / "sub" / "exported.json", weights=weights)
        with torch.no_grad():
            assert (net(io["x"], io["labels"]) - io[key]).abs().max().item() < 1e-5
