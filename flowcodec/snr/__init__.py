"""``flowcodec snr``: accuracy against SNR and channel uses, JSCC against separation.

The config (JSON, ``experiments/snr_cifar10.json``, ``experiments/snr_digits.json``) names a
family, a member (the receiver's), a split point, SNRs, channels and channel-use budgets,
and two kinds of entries:

- ``"jscc"``: JSCC codecs (:class:`~flowcodec.codecs.jscc.JSCCCodec`; ``"codec"`` a shipped
  name or a checkpoint path, or ``"train"`` to train one here). Each is measured at every
  SNR and channel at each of its ``"uses"`` (channel-use counts, or ``"schedule"``: what
  its schedule picks per SNR), optionally told a fixed ``"told_snr"`` whatever the channel
  (SNR mismatch), through the exact link's QAM modulator without channel coding
  (``"uncoded": true``, discrete codecs), and coding ``"views"`` input views (1..4) into
  each transmission (:class:`~flowcodec.codecs.jscc.JSCCCodec`'s ``views``; the same
  channel uses, the device runs its layers once per view);
- ``"digital"``: the separation chain: a learned codec (``"codec"``: a shipped task codec
  with one packet, or ``"train"``) at each of its rate points, its payload bytes sent as
  one transport block (CRC16 + 5G LDPC + QAM) at every MCS of ``"mcs"``. For each channel,
  SNR and channel-use budget, the (rate point, MCS) pair with the highest accuracy on the
  fast (table-driven) link among those whose packets fit the budget is the separation row
  (an image whose packet does not fit, or is lost, gets the decoder's concealment); the
  same pair is then run on the exact link for ``"exact_budgets"`` on ``"exact_samples"``
  images. The choice is made on the test images themselves, and the payload is sent
  without the stream's header and prefix (the receiver is told the rate point): both
  favour separation.

Writes ``snr.csv`` (one row per measurement), ``snr.json`` (rows + config + timing),
``choice.csv`` (:func:`choose`: JSCC or separation at each channel, SNR and budget),
``snr.png`` (accuracy against SNR, one panel per channel) and ``uses.png`` (accuracy
against channel uses at each SNR of ``"uses_plot_snrs"``).

    flowcodec snr --config experiments/snr_cifar10.json --out runs/snr_cifar10
"""

from __future__ import annotations

from flowcodec.snr.cells import (
    accuracy_of,
    digital_base_rows,
    digital_cell,
    digital_jobs,
    digital_rows,
    digital_tables,
    digital_uses,
    jscc_cell,
    jscc_jobs,
    jscc_rows,
)
from flowcodec.snr.config import validate_config
from flowcodec.snr.context import (
    SNRContext,
    check_jscc,
    entry_seed,
    fingerprint,
    jscc_source,
    train_entry,
)
from flowcodec.snr.plot import plot, replot
from flowcodec.snr.rows import SNRRow, best_digital, choose
from flowcodec.snr.sweep import (
    SWEEP,
    SNRSweep,
    add_parser,
    load_config,
    ray_trained_entries,
    run_snr,
    snr_unit,
)

__all__ = ["SNRRow", "run_snr", "load_config", "validate_config", "add_parser", "best_digital",
           "choose", "SWEEP", "SNRSweep", "snr_unit", "ray_trained_entries", "plot", "replot",
           "SNRContext", "accuracy_of", "jscc_jobs", "jscc_cell", "jscc_rows", "digital_tables",
           "digital_jobs", "digital_uses", "digital_cell", "digital_base_rows", "digital_rows",
           "fingerprint", "entry_seed", "train_entry", "jscc_source", "check_jscc"]
