"""Constants shared by the test files: the repository's paths, the checkpoint fixtures, the MNI template and
the tiny model configurations.

Plain constants rather than fixtures because some are needed at collection time (`parametrize`, module-level
globs); import them with `from helpers import ...` (pyproject's `[tool.pytest.ini_options] pythonpath` puts
tests/ on sys.path). The fixtures that do work (saving a tiny checkpoint) are in conftest.py.
"""

from __future__ import annotations

import importlib.resources
import sys
from pathlib import Path

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

#: a tiny ScoreModel: 32 px, no attention, 4 groups (what `save_score_model` saves by default)
TINY_MODEL = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), image_size=32, num_groups=4,
                  dropout=0.0, warmup_steps=1)
#: a tiny DDPM network (or ScoreModel): 16 px, attention at 8 px, 8 groups
TINY_NET = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16, num_groups=8)
#: `lfmri fit --config configs/quickstart.yaml` overrides for a tiny model on a little bundled data
TINY_QUICKSTART_ARGS = [
    "--model.init_args.image_size=32", "--model.init_args.nf=8", "--model.init_args.num_groups=4",
    "--data.init_args.image_size=32", "--data.init_args.crop_size=null", "--data.init_args.batch_size=2",
    "--data.init_args.num_workers=0",
    "--data.init_args.bundled_train_subjects=2", "--data.init_args.bundled_val_subjects=1",
    "--data.init_args.eval_slices_per_volume=1"]
