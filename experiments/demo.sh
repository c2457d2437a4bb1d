#!/usr/bin/env bash
# `make demo`: the whole job on real MRI shipped with the install, on a CPU in about 10 minutes.
#  1. lfmri degrade: simulate a portable low-field scan of a small real brain volume (all four regimes);
#  2. the small-scale transfer of the paper's protocol (experiments/paper/run.py --small): export the prior shipped
#     with lfmri (reference-small, configs/reference_small.yaml) in score_sde's format, fine-tune it through the
#     checkpoint-import path (and the same model from scratch for the same steps, for comparison), evaluate
#     both with baselines on the held-out real brain (Colin27);
#  3. print the results table and the paths of the figure and the checkpoint.
# DEMO_OUT (default runs/demo) holds everything; a second run replaces it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-runs/demo}
LFMRI=${LFMRI:-.venv/bin/lfmri}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT/degrade"

# (a small real volume keeps this step seconds long; the full 181-slice Colin27 test brain takes minutes)
echo "== 1. lfmri degrade: a real brain volume (nibabel's anatomical T1, 33x41x25), four regimes"
VOLUME=$($PY -c "import nibabel, pathlib; print(pathlib.Path(nibabel.__file__).parent / 'tests/data/anatomical.nii')")
for regime in noise noise_blur noise_blur_t2star noise_blur_t2star_b0; do
  $LFMRI degrade "$VOLUME" "$OUT/degrade/$regime.nii.gz" --regime "$regime" --seed 0 \
    --kspace-out "$OUT/degrade/$regime.h5" > /dev/null
  echo "   $OUT/degrade/$regime.nii.gz (+ .json parameters, .h5 k-space)"
done

echo "== 2. small-scale transfer: shipped prior (reference-small) -> export -> fine-tune -> evaluate (and from scratch)"
# the sampler registry's defaults (chosen on VALIDATION volumes: experiments/benchmarks/sampling.py, RESULTS.md);
# the fast baselines only (BM3D and model-based TV take seconds per slice, tuned on validation: they are in
# experiments/benchmarks/quality.py, the full benchmark table)
$PY experiments/paper/run.py bundled --small --pretrained reference-small --out "$OUT/transfer" --overwrite \
  --jobs 2 --finetune-steps 150 --max-slices-per-volume 4 --baselines tv,nlm,tv_complex,nlm_complex

echo
echo "== 3. results (the held-out real brain, Colin27)"
cat "$OUT/transfer/eval_finetune/results.md"
echo
echo "comparison with the from-scratch model and the paper: $OUT/transfer/comparison.md"
echo "figure:     $OUT/transfer/eval_finetune/figure.png"
echo "checkpoint: $OUT/transfer/finetune/checkpoints/last.ckpt"
