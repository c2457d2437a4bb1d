"""`lfmri preview` writes a PNG grid from a LightningCLI config (or a bare data block) of the shipped data."""

import argparse

import matplotlib
import matplotlib.image as mpimg
import pytest
import yaml

from lfmri.commands import preview
from lfmri.data_config import data_block
from lfmri_utils.errors import InputError

DATA = {
    "class_path": "datamodules.LowFieldDataModule",
    "init_args": {
        "source": {"class_path": "datamodules.sources.BundledSource",
                   "init_args": {"n_train": 1, "n_val": 1}},
        "slices": {"image_size": 32},
    },
}


def _run(argv):
    parser = argparse.ArgumentParser()
    preview.register(parser.add_subparsers())
    args = parser.parse_args(["preview", *argv])
    return args.func(args)


def test_preview_from_a_lightning_cli_config(tmp_path, capsys):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        yaml.safe_dump({"model": {"class_path": "x.Y"}, "trainer": {"max_epochs": 1}, "data": DATA})
    )
    out = tmp_path / "sub" / "preview.png"
    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # a caller's own backend (a notebook's, a GUI's) ...
    try:
        assert _run(["--config", str(cfg), "--out", str(out), "--volumes-per-split", "1"]) == 0
        assert matplotlib.get_backend() == "svg"  # ... is left alone
    finally:
        matplotlib.use(backend)
    image = mpimg.imread(out)
    assert image.shape[0] > 300 and image.shape[1] > 600  # 3 rows x 5 panels
    text = capsys.readouterr().out
    assert "train 1, val 1, test 1" in text
    assert "real-colin27" in text and "snr_db" in text and "noise_blur_t2star_b0" in text


def test_preview_accepts_a_bare_data_block_and_rejects_a_config_without_one(tmp_path):
    cfg = tmp_path / "data.yaml"
    cfg.write_text(yaml.safe_dump(DATA))
    assert data_block(cfg) == DATA
    cfg.write_text(yaml.safe_dump(DATA["init_args"]))  # bare init args: the default data module
    assert data_block(cfg) == DATA
    cfg.write_text(yaml.safe_dump({"model": {}, "trainer": {}}))
    with pytest.raises(InputError, match="no data"):
        data_block(cfg)
    with pytest.raises(InputError, match="no such file"):
        data_block(tmp_path / "missing.yaml")


def test_preview_refuses_an_output_that_is_not_a_png_before_building_anything(tmp_path):
    cfg = tmp_path / "data.yaml"
    cfg.write_text(yaml.safe_dump(DATA))
    for out, problem in ((tmp_path / "p.xyz", "must end with .png"), (tmp_path / "p.png", "is a folder")):
        if problem == "is a folder":
            out.mkdir()
        with pytest.raises(InputError, match=problem):
            _run(["--config", str(cfg), "--out", str(out)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.yaml", "p.png"]
