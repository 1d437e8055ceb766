"""``flowcodec rd``: accuracy vs. bytes per image for every codec in a config.

The config (JSON, see ``experiments/rd_cifar10.json`` and ``experiments/rd_digits.json``)
names a family, a member (the receiver's), a split point and a list of codec entries.
A row at a split point off the member's path (a branching family, ``family.path``) is
received by ``family.receiver(point)``, the largest member through that point; every row
says in ``receiver`` which member finished it. Each entry is a baseline (built, fitted on
training features, swept over parameters), a shipped trained codec (``"pretrained"``), or
a learned codec trained here over a ``lam`` sweep (``"train"``). Every result row holds the
accuracy of the receiving member's tail on the decoded features, the measured bytes per
image (``8 * len(to_bytes())`` / 8, headers included), the likelihood estimate where there
is one, and the device's FLOPs (head plus codec encoder) as a share of the whole receiving
member's. Optional ``"channels"`` entries re-run
codecs through an i.i.d. packet-erasure channel or flip payload bits (BSC).

Codecs whose decoder returns the receiver's answer instead of features (``answers =
True``: the device exit's top-1 / top-k, ``"exit-top1"``/``"exit-topk"``) are built with
the family's exit at their split point and scored on the argmax of what they decode (no
tail): their accuracy is the device member's. Any codec in the registry can be an entry,
and any shipped checkpoint a ``"pretrained"`` name, whatever its registry name.
``--baselines RUN/rd.json`` adds the clean rows of an earlier run on the same test set
(e.g. ``experiments/rd_baselines_cifar10.json``) to this run's comparison and plot.

The frozen parts run once per distinct input: the head's output for a test batch and the
tail's logits for a batch of decoded features are kept by content (a BLAKE2 digest of the
tensor), so rows whose decoders return identical tensors (a stripped image codec and its
whole-file twin, exit codecs at one split point) cost one forward pass; the family is in
eval mode, so this changes no number. ``rd.csv`` is rewritten after every row, so an
interrupted run leaves what it measured.

    flowcodec rd --config experiments/rd_cifar10.json --out runs/rd_cifar10

writes ``rd.csv``, ``rd.json``, ``targets.csv`` (:func:`compare`: each learned codec
against the input baselines and float32 at its accuracy) and ``rd.png`` (and
``channel.png`` with channel rows). Rates are given in both framings of
``docs/bitstream.md``: self-contained (``bytes_per_image``, header in every sample) and
session (``session_bytes``, header sent once per session).
"""

from __future__ import annotations

from flowcodec.rd.measure import (
    Memo,
    RDContext,
    build_jobs,
    channel_rows,
    erasure,
    expand,
    make_row,
    measure,
    memos,
    receiver,
    reference_accuracy,
    reference_row,
)
from flowcodec.rd.plot import plot_channel, plot_rd
from flowcodec.rd.rows import (
    FRAMINGS,
    Comparison,
    RDRow,
    cheapest_at_least,
    compare,
    is_answer_codec,
    load_rows,
)
from flowcodec.rd.sweep import (
    SWEEP,
    RDSweep,
    add_parser,
    check_baselines,
    load_config,
    rd_unit,
    rd_warm,
    run_rd,
    write_outputs,
)

__all__ = ["RDRow", "Comparison", "run_rd", "compare", "cheapest_at_least", "add_parser",
           "load_config", "load_rows", "SWEEP", "RDSweep", "FRAMINGS", "is_answer_codec",
           "rd_warm", "rd_unit", "check_baselines", "write_outputs", "plot_rd", "plot_channel",
           "RDContext", "build_jobs", "expand", "reference_row", "measure", "channel_rows",
           "Memo", "memos", "receiver", "erasure", "reference_accuracy", "make_row"]
