#!/usr/bin/env bash
# The paper-style sweep on a Stable Diffusion 1.x pipeline folder on your disk (e.g. a local copy of
# SD 1.5 as save_pretrained writes it, or a model id already in your Hugging Face cache):
#
#   CLIP_MODEL=/path/to/clip-vit-large-patch14 results/reference/run_sd.sh /path/to/sd-1.5 [cuda] [results/sd]
#
# Rewards: clip (CLIP_MODEL, the text in REWARD_TEXT); REWARD=aesthetic also needs AESTHETIC_HEAD
# (LAION's sac+logos+ava1-l14-linearMSE.pth). Frozen networks in fp16 (DTYPE), leaves in fp32; the
# reference gradient is checkpointed backprop in the task's precision. Resumable: run it again to
# finish an interrupted sweep. Then: python -m bench report OUT
set -euo pipefail
MODEL=${1:?usage: CLIP_MODEL=DIR run_sd.sh MODEL_DIR [DEVICE=cuda] [OUT=results/sd]}
DEVICE=${2:-cuda}
OUT=${3:-results/sd}
CLIP_MODEL=${CLIP_MODEL:?set CLIP_MODEL to a local CLIPModel folder (e.g. clip-vit-large-patch14)}
REWARD=${REWARD:-clip}
DTYPE=${DTYPE:-fp16}
TASK="sd[model=$MODEL,clip_model=$CLIP_MODEL,reward=$REWARD,dtype=$DTYPE,batch=${BATCH:-2},reference=task"
if [ -n "${AESTHETIC_HEAD:-}" ]; then TASK="$TASK,aesthetic_head=$AESTHETIC_HEAD"; fi
TASK="$TASK]"
cd "$(dirname "$0")/../.."
exec python -m bench run --tasks "$TASK" --device "$DEVICE" \
    --estimators 'full,checkpoint,adjoint,sdo,truncated[k=1],truncated[k=5],draft-lv' \
    --targets latent,cond,weights --steps 10,20,50 --seeds 0,1 --iters 8 --rounds 3 \
    --timeout 3600 --out "$OUT"
