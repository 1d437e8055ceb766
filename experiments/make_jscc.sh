#!/usr/bin/env bash
# Train the shipped JSCC codec (analog, 16 complex symbols, split point 2 of CIFAR-10), its
# 16-QAM variant (kept in runs/, not shipped: the zoo stays under 30 MB), and measure both
# against separation. Needs $FLOWCODEC_DATA. About 45 min on 2 CPU cores.
set -euo pipefail
PY=${PY:-.venv/bin/python}
$PY -m experiments.train_jscc --out cifar10-jscc_p2 --seconds ${ANALOG_SECONDS:-1560}
$PY -m experiments.train_jscc --out cifar10-jscc16_p2 --constellation qam16 \
    --init flowcodec/zoo/codecs/cifar10-jscc_p2 --no-zoo --seconds ${QAM_SECONDS:-420}
$PY -m flowcodec.cli snr --config experiments/snr_cifar10.json --out runs/snr_cifar10
