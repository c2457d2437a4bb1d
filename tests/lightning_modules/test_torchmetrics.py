"""The torchmetrics Metrics of `lightning_modules.metric_classes` against fastMRI's definitions computed with
scikit-image / numpy (the oracle), their accumulation over volumes and their merge across processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lfmri.evaluation import _volume_metrics
from lightning_modules.metric_classes import (
    FASTMRI_METRICS,
    VolumeNMSE,
    VolumePSNR,
    VolumeSSIM,
    fastmri_collection,
    volume_metrics,
)

#: volumes of different layouts: [S,H,W], one [H,W] slice, [S,1,H,W], the smallest SSIM slice (7x7)
SHAPES = [(3, 24, 20), (31, 17), (2, 1, 16, 30), (1, 7, 7), (4, 40, 33)]


def _volume(shape: tuple[int, ...], seed: int, rel_sigma: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(pred, ref) float64 magnitudes: a smooth random reference of its own scale and |ref + noise|."""
    rng = np.random.default_rng(seed)
    ref = np.abs(np.cumsum(rng.normal(size=shape), axis=-1)) * rng.uniform(0.5, 5.0)
    pred = np.abs(ref + rng.normal(0, rel_sigma * ref.max(), shape))
    return pred, ref


def _oracle(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """fastMRI's evaluate.py on one volume: skimage SSIM per slice (7x7 uniform window) and PSNR with the
    VOLUME's data range, NMSE = ||pred - ref||^2 / ||ref||^2."""
    ref3, pred3 = ref.reshape(-1, *ref.shape[-2:]), pred.reshape(-1, *pred.shape[-2:])
    L = ref3.max()
    ssim = np.mean([structural_similarity(r, p, data_range=L) for r, p in zip(ref3, pred3, strict=True)])
    return {"ssim": float(ssim), "psnr": float(peak_signal_noise_ratio(ref3, pred3, data_range=L)),
            "nmse": float(np.linalg.norm(ref3 - pred3) ** 2 / np.linalg.norm(ref3) ** 2)}


@pytest.fixture(scope="module")
def volumes() -> list[tuple[np.ndarray, np.ndarray]]:
    return [_volume(shape, seed) for seed, shape in enumerate(SHAPES)]


@pytest.mark.parametrize("name", list(FASTMRI_METRICS))
def test_one_volume_equals_the_skimage_oracle(volumes, name: str) -> None:
    for pred, ref in volumes:
        metric = FASTMRI_METRICS[name]()
        metric.update(torch.from_numpy(pred), torch.from_numpy(ref))
        value = metric.compute()
        assert value.dtype == torch.float64 and value.ndim == 0
        assert float(value) == pytest.approx(_oracle(pred, ref)[name], rel=1e-9, abs=1e-12), pred.shape


def test_the_collection_is_the_mean_over_volumes_of_the_oracle(volumes) -> None:
    collection = fastmri_collection(prefix="val/", postfix="/noise")
    for pred, ref in volumes:
        collection.update(torch.from_numpy(pred).float(), torch.from_numpy(ref).float())  # float32, as logged
    got = collection.compute()
    assert set(got) == {"val/ssim/noise", "val/psnr/noise", "val/nmse/noise"}
    oracle = [_oracle(p, r) for p, r in volumes]
    for name in FASTMRI_METRICS:
        expected = np.mean([o[name] for o in oracle])
        assert float(got[f"val/{name}/noise"]) == pytest.approx(expected, rel=1e-5), name


def test_accumulation_is_the_exact_mean_of_the_per_volume_values_in_any_order(volumes) -> None:
    """compute() is the correctly rounded mean of the volumes' values (`volume_metrics`, the functions
    `lfmri evaluate` scores a volume with), bit for bit, whatever order the volumes came in."""
    per_volume = [volume_metrics(p, r) for p, r in volumes]
    rng = np.random.default_rng(0)
    for _ in range(4):
        collection = fastmri_collection()
        for k in rng.permutation(len(volumes)):
            collection.update(*volumes[k])
        got = collection.compute()
        for name in FASTMRI_METRICS:
            values = [v[name] for v in per_volume]
            assert float(got[name]) == math.fsum(values) / len(values), name


def test_evaluate_scores_a_volume_as_the_metrics_do(volumes) -> None:
    for pred, ref in volumes:
        collection = fastmri_collection()
        collection.update(pred, ref)
        got = collection.compute()
        assert _volume_metrics(pred, ref) == tuple(float(got[n]) for n in ("ssim", "psnr", "nmse"))


def test_wide_ranges_sum_exactly_in_any_order() -> None:
    """Values spanning many orders of magnitude (NMSE of bad and near-perfect volumes): floating-point sums
    in different orders differ; the metric's mean does not."""
    rng = np.random.default_rng(1)
    errors = 10.0 ** rng.uniform(-12, 4, 40)
    ref = np.ones((1, 7, 7))
    volumes = [(ref + math.sqrt(e), ref) for e in errors]  # NMSE = e up to round-off
    orders = [rng.permutation(len(volumes)) for _ in range(6)]
    results = set()
    for order in orders:
        metric = VolumeNMSE()
        for k in order:
            metric.update(*volumes[k])
        results.add(float(metric.compute()))
    assert len(results) == 1
    values = [VolumeNMSE.volume_fn(pred, ref) for pred, ref in volumes]
    assert len({sum(values[k] for k in order) for order in orders}) > 1  # order-dependent sums differ here


def test_two_ranks_merged_equal_one_process(volumes) -> None:
    """A 2-process sync simulated: the volumes dealt to two 'ranks' (alternately, or all to rank 0), rank 1's
    state merged into rank 0's as torchmetrics' cat reduction does, equal one process scoring them all, bit
    for bit."""
    single = fastmri_collection()
    for pred, ref in volumes:
        single.update(pred, ref)
    for deal in (lambda k: k % 2, lambda k: 0):
        ranks = [fastmri_collection(), fastmri_collection()]
        for k, (pred, ref) in enumerate(volumes):
            ranks[deal(k)].update(pred, ref)
        for name in FASTMRI_METRICS:
            ranks[0][name].merge_state(ranks[1][name])
            assert float(ranks[0][name].compute()) == float(single.compute()[name]), name


def test_non_finite_and_empty() -> None:
    ref = np.linspace(0.1, 1.0, 64).reshape(1, 8, 8)
    metric = VolumePSNR()
    metric.update(ref, ref)  # identical volumes: an infinite PSNR
    metric.update(ref * 0.9, ref)
    assert float(metric.compute()) == math.inf
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(VolumeSSIM().compute()))
    assert VolumeSSIM.higher_is_better and VolumePSNR.higher_is_better and not VolumeNMSE.higher_is_better


WORKER = textwrap.dedent('''
    import json, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[5])
    from lightning_modules.metric_classes import fastmri_collection

    rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    arrays = np.load(sys.argv[4])
    volumes = [(arrays[f"pred{k}"], arrays[f"ref{k}"]) for k in range(len(arrays.files) // 2)]
    # moved to the device as the callback moves them (`.to` must not undo the float64 of an empty state)
    dealt, rank0_only = fastmri_collection().to("cpu"), fastmri_collection().to("cpu")
    for k, (pred, ref) in enumerate(volumes):
        if k % 2 == rank:
            dealt.update(torch.from_numpy(pred), torch.from_numpy(ref))
        if rank == 0:  # rank 1 has no volume of this one: it sends an empty state
            rank0_only.update(torch.from_numpy(pred), torch.from_numpy(ref))
    result = {"dealt": {k: float(v).hex() for k, v in dealt.compute().items()},
              "rank0_only": {k: float(v).hex() for k, v in rank0_only.compute().items()}}
    dist.destroy_process_group()
    with open(out, "w") as fh:
        json.dump(result, fh)
''')


@pytest.mark.slow
def test_gloo_two_processes_sync_to_the_one_process_numbers(volumes, tmp_path: Path) -> None:
    """Two real gloo processes: compute() gathers both ranks' volumes (torchmetrics' sync) and both ranks get
    exactly the one-process numbers, also when one rank saw no volume."""
    single = fastmri_collection()
    for pred, ref in volumes:
        single.update(pred, ref)
    expected = {k: float(v).hex() for k, v in single.compute().items()}
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    data = tmp_path / "volumes.npz"
    np.savez(data, **{f"pred{k}": p for k, (p, _) in enumerate(volumes)},
             **{f"ref{k}": r for k, (_, r) in enumerate(volumes)})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "store"),
                               str(tmp_path / f"rank{rank}.json"), str(data), str(REPO)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"dealt": expected, "rank0_only": expected}, rank
