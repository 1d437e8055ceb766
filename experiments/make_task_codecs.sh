#!/usr/bin/env bash
# Reproduce every shipped task codec (docs/codecs.md, "Low-rate task codecs"), in order, on
# CPU (about 45 minutes per training on 2 cores; pass DEVICE=cuda:0 to use a GPU) and
# regenerate their results:
#   FLOWCODEC_DATA=../shared/data bash experiments/make_task_codecs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cpu}
SECONDS_PER_CODEC=${SECONDS_PER_CODEC:-2700}
mkdir -p runs
# split point 2: a 32-number vector, 5 rate points, 4 packets trained with 10% drops
$PY -m experiments.train_task_codecs --point 2 --packets 4 --drop-prob 0.1 --epochs 40 \
    --seconds "$SECONDS_PER_CODEC" --device "$DEVICE" --eval 0 --out cifar10-task_p2
# split point 1: a 16x4x4 latent map, 5 rate points, 4 packets trained with 10% drops
$PY -m experiments.train_task_codecs --point 1 --grid 4 --latent 16 --packets 4 \
    --drop-prob 0.1 --lams 2.0 1.0 0.5 0.25 0.12 --epochs 40 \
    --seconds "${SECONDS_P1:-2100}" --device "$DEVICE" --eval 0 --out cifar10-task_p1
# one-packet forms (same weights) and the channel-wise context model at point 2
$PY -m experiments.derive_task_variants --codec cifar10-task_p2 --point 2 --eval 0
$PY -m experiments.derive_task_variants --codec cifar10-task_p1 --point 1 --no-context --eval 0
$PY -m experiments.plot_task_training --out docs/img
.venv/bin/flowcodec rd --config experiments/rd_task_cifar10.json --out runs/rd_task_cifar10
# the point-2 context codec coding 1, 2 or 4 views of each input (no training)
.venv/bin/flowcodec rd --config experiments/rd_task_views_cifar10.json \
    --out runs/rd_task_views_cifar10
# split point 1 lifted from the point-2 context codec: the trunk's stage copied into the
# encoder, the decoder followed by a Lift, only the decoder trained (about 40 minutes)
$PY -m experiments.train_task_codecs --point 1 --lift-from cifar10-task_p2_ctx \
    --lams 3.0 1.5 0.8 0.4 0.2 --epochs 12 --seconds 2400 --lr 2e-3 --stem-lr 2e-4 \
    --device "$DEVICE" --eval 0 --out cifar10-task_p1_lift
.venv/bin/flowcodec rd --config experiments/rd_task_lift_cifar10.json \
    --out runs/rd_task_lift_cifar10
.venv/bin/flowcodec latency --config experiments/latency_task_cifar10.json \
    --out runs/latency_task_cifar10
