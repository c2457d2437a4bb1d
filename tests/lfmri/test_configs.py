"""Every YAML config parses through `lfmri fit --print_config`, and the run configs say what they promise.

Each file in configs/ (recursively) and experiments/paper/ is parsed in-process by the real LightningCLI:
a full run config alone (`--config X`); a `class_path` block of configs/model or configs/data as
`--config configs/quickstart.yaml --model X` (or `--data X`); any other partial config (e.g. a logger
overlay) on top of the quickstart (`--config configs/quickstart.yaml --config X`). Required values written
`???` are given on the command line, as a user must.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import QUICKSTART, REPO

from diffusion.networks.ddpm import DDPM, DDPMConfig
from lfmri.lightning_cli import run_lightning_cli

MAIN_KEYS = {"seed_everything", "trainer", "model", "data", "ckpt_path", "optimizer", "lr_scheduler"}
CONFIGS = sorted((REPO / "configs").rglob("*.yaml")) + sorted((REPO / "experiments" / "paper").glob("*.yaml"))
PARAMS_34M = 34_425_602
NETWORK_34M = REPO / "configs" / "model" / "ddpm_34m.yaml"
#: run configs used stacked on a block that holds what they leave out (their headers say so)
STACKED_ON = {"configs/finetune_mouse.yaml": NETWORK_34M, "configs/pretrain_fastmri.yaml": NETWORK_34M,
              "configs/reference_small.yaml": QUICKSTART, "experiments/paper/small_finetune.yaml": QUICKSTART}


def required_leaves(node: object, prefix: str = "") -> list[str]:
    """Dotted keys of the `???` (required) values in a YAML tree; list items are not descended."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in required_leaves(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "???" else []


def cli_args(path: Path) -> list[str]:
    """The `lfmri fit` arguments that parse `path` the way its kind is meant to be used (module docstring)."""
    content = yaml.safe_load(path.read_text()) or {}
    if "class_path" in content:  # a model or data block
        block = path.parent.name if path.parent.name in ("model", "data") else (
            "data" if "DataModule" in content["class_path"] else "model")
        args = ["--config", str(QUICKSTART), f"--{block}", str(path)]
        required = [f"{block}.{k}" for k in required_leaves(content)]
    elif set(content) <= MAIN_KEYS:
        standalone = {"model", "data"} <= set(content)
        args = ["--config", str(path)] if standalone else ["--config", str(QUICKSTART), "--config", str(path)]
        if rel(path) in STACKED_ON:
            args = ["--config", str(STACKED_ON[rel(path)]), *args]
        required = required_leaves(content)
    else:  # a bare block of another group, e.g. configs/trainer/X.yaml
        args = ["--config", str(QUICKSTART), f"--{path.parent.name}", str(path)]
        required = [f"{path.parent.name}.{k}" for k in required_leaves(content)]
    return args + [f"--{key}=/given/on/the/command/line" for key in required]


def print_config(args: list[str], monkeypatch: pytest.MonkeyPatch) -> dict:
    """`lfmri fit ARGS --print_config` in this process -> the printed (resolved) config as a dict."""
    monkeypatch.setattr(sys, "argv", ["lfmri"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        run_lightning_cli(["fit", *args, "--print_config"])
    assert stop.value.code in (0, None), out.getvalue()
    return yaml.safe_load(out.getvalue())


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.fixture(scope="module")
def parsed() -> dict[str, dict]:
    """{relative path: printed config} of every config (module-scoped: one CLI parse per file)."""
    with pytest.MonkeyPatch.context() as mp:
        return {rel(p): print_config(cli_args(p), mp) for p in CONFIGS}


def n_params(net: dict) -> int:
    """Parameters of the DDPM a ScoreModel's init_args build (on the meta device: no memory, no time)."""
    with torch.device("meta"):
        return sum(p.numel() for p in DDPM(DDPMConfig(**net)).parameters())


def callbacks(config: dict) -> dict[str, dict]:
    """{class name: init_args} of the trainer's callbacks."""
    return {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args") or {}
            for c in config["trainer"].get("callbacks") or []}


def test_the_configs_we_ship_are_all_found():
    names = {rel(p) for p in CONFIGS}
    for expected in ("configs/quickstart.yaml", "configs/finetune_mouse.yaml",
                     "configs/pretrain_fastmri.yaml", "configs/model/ddpm_34m.yaml",
                     "configs/reference_small.yaml", "experiments/paper/small_finetune.yaml"):
        assert expected in names


@pytest.mark.parametrize("path", CONFIGS, ids=rel)
def test_every_config_parses_with_print_config(path, parsed):
    config = parsed[rel(path)]
    assert {"trainer", "model", "data"} <= set(config)
    assert "???" not in yaml.safe_dump(config), "a required value was left unset"
    content = yaml.safe_load(path.read_text()) or {}
    if "class_path" in content:  # the block really replaced the quickstart's
        block = config["model"] if content["class_path"].endswith("ScoreModel") else config["data"]
        given = leaves(block["init_args"])
        for key, value in leaves(content.get("init_args") or {}).items():
            if value != "???":  # required: given on the command line
                assert given[key] == value, key


def test_required_paths_are_required_and_given_on_the_command_line(parsed):
    finetune = yaml.safe_load((REPO / "configs/finetune_mouse.yaml").read_text())
    pretrain = yaml.safe_load((REPO / "configs/pretrain_fastmri.yaml").read_text())
    root = "data.init_args.source.init_args.root"
    assert required_leaves(finetune) == ["model.init_args.pretrained.path", root]
    assert required_leaves(pretrain) == [root]
    given = parsed["configs/finetune_mouse.yaml"]
    data_root = given["data"]["init_args"]["source"]["init_args"]["root"]
    assert given["model"]["init_args"]["pretrained"]["path"] == data_root == "/given/on/the/command/line"


@pytest.mark.parametrize("name", ["configs/model/ddpm_34m.yaml", "configs/finetune_mouse.yaml",
                                  "configs/pretrain_fastmri.yaml"])
def test_the_34m_configs_build_exactly_34_425_602_parameters(name, parsed):
    init_args = parsed[name]["model"]["init_args"]
    assert (init_args["net"]["image_size"], init_args["net"]["num_channels"]) == (256, 2)
    assert n_params(init_args["net"]) == PARAMS_34M


def test_finetune_mouse_is_the_papers_fine_tune(parsed):
    config = parsed["configs/finetune_mouse.yaml"]
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
    assert trainer["max_epochs"] == 15 and trainer["precision"] == "bf16-mixed"
    assert model["loss"]["dsm_weight"] > 0 and model["loss"]["supervised_weight"] > 0  # DSM + supervised
    assert model["pretrained"]["weights"] == "ema"
    # random 256 x 256 training crops (the network's image_size) of native slices; whole slices elsewhere
    assert data["source"]["class_path"] == "datamodules.sources.NiftiDirSource"
    assert data["slices"]["crop_size"] == model["net"]["image_size"] == 256
    assert data["slices"]["image_size"] is None
    assert trainer["logger"]["class_path"].endswith("CSVLogger")
    cbs = callbacks(config)
    assert cbs["ModelCheckpoint"]["save_last"] is True and "FiniteLossGuard" in cbs
    # the network is exactly configs/model/ddpm_34m.yaml's, written there only: the run config stacks on it
    block = parsed["configs/model/ddpm_34m.yaml"]["model"]["init_args"]
    assert model["net"] == block["net"] and model["grad_checkpointing"] == block["grad_checkpointing"]


@pytest.mark.parametrize("name", sorted(n for n, base in STACKED_ON.items() if base == NETWORK_34M))
def test_run_configs_hold_only_what_differs_from_the_block_they_stack_on(name):
    own = yaml.safe_load((REPO / name).read_text())["model"]["init_args"]
    block = yaml.safe_load(STACKED_ON[name].read_text())["model"]["init_args"]
    assert not set(own) & set(block), set(own) & set(block)  # the network and SDE are written once


def test_pretrain_fastmri_trains_a_dsm_only_prior_from_fastmri(parsed):
    config = parsed["configs/pretrain_fastmri.yaml"]
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert data["source"]["class_path"] == "datamodules.sources.FastMRISource" and model["pretrained"] is None
    slices = data["slices"]
    assert slices["crop_size"] == model["net"]["image_size"] == 256 and slices["image_size"] is None
    assert model["loss"]["dsm_weight"] > 0 and model["loss"]["supervised_weight"] == 0
    assert config["trainer"]["max_steps"] >= 100_000
    cbs = callbacks(config)
    assert cbs["ModelCheckpoint"]["save_last"] is True and "FiniteLossGuard" in cbs


@pytest.mark.parametrize("name", ["configs/quickstart.yaml", "configs/data/bundled.yaml",
                                  "configs/data/nifti_dir.yaml"])
def test_data_blocks_train_on_crops_of_native_slices(name, parsed):
    data = parsed[name]["data"]["init_args"]["slices"]
    assert data["image_size"] is None and data["crop_size"] >= 8
    if name == "configs/quickstart.yaml":
        assert data["crop_size"] == parsed[name]["model"]["init_args"]["net"]["image_size"] == 64
        assert parsed[name]["trainer"]["limit_val_batches"] <= 4  # whole native slices: a few batches


def leaves(node: object, prefix: str = "") -> dict[str, object]:
    """{dotted key: value} of a YAML tree's leaves; a list (e.g. trainer.callbacks) is one leaf."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in leaves(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


@pytest.mark.parametrize("name", [n for n, base in STACKED_ON.items() if base == QUICKSTART])
def test_configs_stacked_on_the_quickstart_hold_only_what_differs(name, parsed):
    """A run config stacked on configs/quickstart.yaml sets nothing the quickstart already resolves to
    (no second copy of a value to keep in sync), and the stack resolves to what the file says."""
    own = leaves(yaml.safe_load((REPO / name).read_text()))
    base, stacked = leaves(parsed["configs/quickstart.yaml"]), leaves(parsed[name])
    assert own and all(key in base for key in own), [k for k in own if k not in base]
    same = [key for key, value in own.items() if base[key] == value and "${" not in yaml.safe_dump(value)]
    assert not same, f"{name} repeats the quickstart's {same}"
    for key, value in own.items():
        if "${" not in yaml.safe_dump(value):
            assert stacked[key] == value, key


def test_the_reference_prior_fine_tunes_into_the_small_protocol_and_the_quickstart(parsed):
    ref = parsed["configs/reference_small.yaml"]
    fine = parsed["experiments/paper/small_finetune.yaml"]
    quick = parsed["configs/quickstart.yaml"]
    net = ref["model"]["init_args"]["net"]
    for other in (fine, quick):  # the shipped weights load strictly into both
        assert net == other["model"]["init_args"]["net"]
    ref_slices, fine_slices = ref["data"]["init_args"]["slices"], fine["data"]["init_args"]["slices"]
    assert ref_slices["slice_axis"] == fine_slices["slice_axis"] == 2
    assert ref["model"]["init_args"]["loss"]["supervised_weight"] > 0
    assert ref["model"]["init_args"]["loss"]["dsm_weight"] > 0
    assert ref_slices["crop_size"] == net["image_size"]
    assert n_params(net) * 4 <= 10 * 2**20  # float32 EMA weights within the 10 MB the repository ships
