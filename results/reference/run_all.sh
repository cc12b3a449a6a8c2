#!/usr/bin/env bash
# Regenerates the reference results that `python -m bench figures` draws (about 50 min on 2 CPU
# cores; nothing else should run meanwhile, or the timings say so). Each run appends to its
# folder and skips cells already there (--force reruns).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
# Figures 2 and 4: cost and gradient agreement against N for the built-in estimators.
$PY -m bench run --tasks digits --targets weights --steps 10,20,50,100 \
    --estimators full,checkpoint,adjoint,sdo,"truncated[k=1]" --out results/reference/digits-scaling "$@"
# ... and the further estimators at the smaller N (their costs grow fast: edict 6NF + 2NV).
$PY -m bench run --tasks digits --targets weights --steps 10,20 \
    --estimators "checkpoint[recursive=true]",edict,torchdiffeq-adjoint,draft-lv,zeroth-order \
    --out results/reference/digits-scaling "$@"
# Figure 1: sdo against full at N = 50, same number of Adam iterations, two seeds.
$PY -m bench run --tasks digits --targets latent,weights --steps 50 --iters 12 --seeds 0,1 \
    --estimators full,sdo --out results/reference/digits-sdo "$@"
# Figure 3: DRaFT-K, the truncation depth K at N = 50.
$PY -m bench run --tasks digits --targets weights --steps 50 --iters 8 \
    --estimators full,"truncated[k=1]","truncated[k=2]","truncated[k=5]","truncated[k=10]","truncated[k=25]" \
    --out results/reference/digits-draft-k "$@"
# Figure 5: the frontier, every estimator on digits weights at N = 50 (two seeds; about 25 min).
$PY -m bench run --tasks digits --targets weights --steps 50 --iters 0 --seeds 0,1 \
    --estimators full,checkpoint,adjoint,"adjoint[solver=heun]","adjoint[recover=cache,steps=12]",sdo,\
"truncated[k=1]","truncated[k=12]","truncated[k=12,latent_path=true]",draft-lv,zeroth-order,edict,\
torchdiffeq-adjoint,coarse-adjoint,"coarse-adjoint[budget=0.125]","coarse-adjoint[budget=0.5]" \
    --out results/reference/digits-frontier "$@"
