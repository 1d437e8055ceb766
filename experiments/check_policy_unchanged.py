"""Compare the policy's decisions with those of an earlier ``flowcodec/policy.py``.

Loads ``policy.py`` as it was at ``--commit`` (via ``git show``) and decides with both
versions on the toy profile and every ``profile.json`` given, at 5 accuracy floors,
10 SNRs and 4 symbol rates. It exits with status 1 on the first decision that differs in
point, rate, MCS, threshold, expected accuracy, latency, packet loss or feasibility.

    nice -n 19 .venv/bin/python experiments/check_policy_unchanged.py --commit f7d7e5d \\
        runs/latency_task_cifar10/profile.json runs/latency_task_cifar10_f4/profile.json
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--commit", required=True)
    ap.add_argument("profiles", nargs="*")
    args = ap.parse_args(argv)
    src = subprocess.run(["git", "show", f"{args.commit}:flowcodec/policy.py"], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "policy_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("policy_old", path)
    old = importlib.util.module_from_spec(spec)
    sys.modules["policy_old"] = old
    spec.loader.exec_module(old)
    import flowcodec.policy as new

    pairs = [("toy", old.toy_profile(), new.toy_profile())]
    pairs += [(p, old.Profile.load(p), new.Profile.load(p)) for p in args.profiles]
    n = 0
    for name, po, pn in pairs:
        for floor in (0.5, 0.8, 0.85, 0.9, 0.95):
            a, b = old.Policy(po, floor, delay_s=0.005), new.Policy(pn, floor, delay_s=0.005)
            for snr in (-5, -2, 0, 2.5, 5, 7.5, 10, 15, 20, 30):
                for rate in (1e4, 1e5, 1e6, 1e7):
                    da, db = a.decide(snr, rate), b.decide(snr, rate)
                    keys = ("point", "rate", "mcs", "threshold", "expected_accuracy",
                            "expected_latency_s", "packet_loss", "feasible")  # fmt: skip
                    fa = [getattr(da, k) for k in keys]
                    fb = [getattr(db, k) for k in keys]
                    if fa != fb or db.kind != "digital":
                        print(f"differs: {name} floor {floor} {snr} dB {rate:g}/s: {fa} != {fb}")
                        return 1
                    n += 1
    print(f"{n} decisions identical")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
