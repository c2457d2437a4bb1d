"""Constants shared by the test files: the repository's paths, the checkpoint fixtures, the MNI template and
the tiny model configurations; `slice_sample`, a fake data sample; `refused`, the check of a refusal; and
`script_module`, an experiment script imported as a module.

Plain constants rather than fixtures because some are needed at collection time (`parametrize`, module-level
globs); import them with `from helpers import ...` (pyproject's `[tool.pytest.ini_options] pythonpath` puts
tests/ on sys.path). The fixtures that do work (saving a tiny checkpoint) are in conftest.py.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from diffusion.networks.ddpm import DDPMConfig

#: the repository root
REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
#: the `lfmri` console script of the running interpreter (for tests that run whole commands as processes)
LFMRI = Path(sys.executable).with_name("lfmri")

#: real-format checkpoints of each public family, made by the original code (each folder has a README)
FIXTURES = REPO / "tests" / "fixtures"
FAMILY_CHECKPOINTS = {"score_sde": FIXTURES / "score_sde_tiny" / "checkpoint.pth",
                      "hfs_sde": FIXTURES / "hfs_sde_vp_tiny" / "checkpoint.pth",
                      "score_mri": FIXTURES / "score_mri_ncsnpp_ve_tiny" / "checkpoint.pth",
                      "dds": FIXTURES / "dds_adm_tiny" / "checkpoint.pt"}
SCORE_SDE_FIXTURE = FIXTURES / "score_sde_tiny"
SCORE_SDE_CKPT = FAMILY_CHECKPOINTS["score_sde"]
#: the DDPM network of the score_sde_tiny fixture
SCORE_SDE_NET = dict(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16)

#: nilearn's MNI152 T1 template (real human MRI, 197 x 233 x 189, installed with nilearn)
MNI = importlib.resources.files("nilearn") / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"

#: the network of a tiny ScoreModel (`DDPMConfig` fields): 32 px, no attention, 4 groups
TINY_MODEL_NET = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), image_size=32,
                      num_groups=4, dropout=0.0)
#: a tiny ScoreModel's arguments (what `save_score_model` saves by default)
TINY_MODEL = dict(net=DDPMConfig(**TINY_MODEL_NET), optim={"warmup_steps": 1})
#: a tiny ScoreModel trained at 16 px (attention at 8 px), its arguments as YAML values (lists): what a
#: config's `model.init_args` holds (the one-inference-path and shared-path tests)
TINY_16_MODEL = {
    "net": DDPMConfig(**{**TINY_MODEL_NET, "attn_resolutions": (8,), "image_size": 16}).to_dict(),
    "optim": {"warmup_steps": 1}}
#: a tiny DDPM network (`DDPMConfig` fields): 16 px, attention at 8 px, 8 groups
TINY_NET = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16, num_groups=8)
#: `lfmri fit --config configs/quickstart.yaml` overrides for a tiny model on a little bundled data
TINY_QUICKSTART_ARGS = [
    "--model.init_args.net.image_size=32", "--model.init_args.net.nf=8", "--model.init_args.net.num_groups=4",
    "--data.init_args.slices.image_size=32", "--data.init_args.slices.crop_size=null",
    "--data.init_args.loader.batch_size=2", "--data.init_args.loader.num_workers=0",
    "--data.init_args.source={class_path: BundledSource, init_args: {n_train: 2, n_val: 1}}",
    "--data.init_args.slices.eval_per_volume=1"]


def refused(argv: list[str], capsys, *absent: Path) -> str:
    """Run `lfmri argv` in this process (`capsys`: pytest's fixture): it must exit 2 with one line on stderr,
    an `error:` line, which is returned; none of the paths `absent` may exist after it, nor a hidden
    (temporary) file in the first one's folder."""
    from lfmri.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err
    for path in absent:
        assert not path.exists()
    if absent:
        assert not list(absent[0].parent.glob(".*"))  # no temporary file left behind
    return err


def slice_sample(clean, degraded, index: int = 0):
    """A `datamodules.SliceSample` of `clean` and `degraded` float [2, H, W], for tests that need only those:
    `y` the degraded image's k-space, neutral params, regime "noise", volume `s<index>`, slice `index`, scale
    1."""
    import torch

    from datamodules.samples import SliceSample
    from degradations import channels_to_complex, fft2c, neutral_params

    params = {k: v[0] for k, v in neutral_params(1, *clean.shape[-2:]).items()}
    return SliceSample(clean=clean, degraded=degraded, y=fft2c(channels_to_complex(degraded[None]))[0],
                       regime="noise", params=params, volume_id=f"s{index}",
                       slice=torch.tensor(index, dtype=torch.int64), scale=torch.tensor(1.0))


def predict_config(folder: Path, volume: Path, model_init_args: dict | None = None,
                   data_init_args: dict | None = None) -> Path:
    """`folder/predict.yaml`: an `lfmri predict` config on CPU without a logger, writing NIfTI predictions to
    `folder/pred`, reading `volume`; the model block names the class (plus `model_init_args`; without them its
    network comes from the checkpoint's hyper-parameters), the data block `predict.path` plus
    `data_init_args` (their `predict` group merged with the path)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    model: dict = {"class_path": "lightning_modules.module.ScoreModel"}
    if model_init_args is not None:
        model["init_args"] = model_init_args
    config = folder / "predict.yaml"
    data = dict(data_init_args or {})
    config.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(folder / "run"),
                    "callbacks": [{"class_path": "lightning_modules.callbacks.NiftiPredictionWriter",
                                   "init_args": {"output_dir": str(folder / "pred")}}]},
        "model": model,
        "data": {"class_path": "datamodules.LowFieldDataModule",
                 "init_args": {**data, "predict": {"path": str(volume), **data.get("predict", {})}}},
    }))
    return config


@contextmanager
def script_module(path: Path, name: str) -> Iterator[ModuleType]:
    """The script at `path` imported as module `name` (registered in sys.modules while in use, so its
    dataclasses resolve their annotations; removed after)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
