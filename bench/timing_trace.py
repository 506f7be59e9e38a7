"""How timing noise looks on this machine: two models timed interleaved for a while, as
``measure_latency`` times them (ABBA rounds, 20 ms of untimed runs after each switch, then
5 timed runs), with each model's median per time bin, and at the end the ratio of medians
against the ratio of lower quartiles (what decisions use).

    python bench/timing_trace.py ORIGINAL.onnx OTHER.onnx [--data CALIB.npz] [--seconds 30] [--bin 0.5]
                                 [--threads N]

Feeds: the first sample of each input in ``--data`` (an .npz keyed by input name), else
seeded random inputs of the model's shape at batch 1 (other dims must be fixed).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx

from onnxcompress.data import input_specs
from onnxcompress.runtime import DECISION_QUANTILE, make_session, run_session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs=2)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--bin", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data", default=None)
    args = ap.parse_args()
    models = [onnx.load(p) for p in args.models]
    if args.data:
        with np.load(args.data) as z:
            feeds = {s.name: z[s.name][:1] for s in input_specs(models[0])}
    else:
        rng = np.random.default_rng(0)
        feeds = {s.name: rng.random([1 if i == 0 else int(d) for i, d in enumerate(s.shape)]).astype(s.dtype)
                 for s in input_specs(models[0])}
    sessions = [make_session(m, "cpu", threads=args.threads, label=p) for m, p in zip(models, args.models)]
    for s, p in zip(sessions, args.models):
        for _ in range(50):
            run_session(s, feeds, p)
    rows: list[tuple[float, float, float]] = []
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        blocks = []
        for k in ((0, 1) if len(rows) % 2 == 0 else (1, 0)):
            t_switch = time.perf_counter()
            while time.perf_counter() - t_switch < 0.02:
                run_session(sessions[k], feeds, args.models[k])
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                run_session(sessions[k], feeds, args.models[k])
                ts.append((time.perf_counter() - t0) * 1e3)
            blocks.append((k, float(np.median(ts))))
        by = dict(blocks)
        rows.append((time.perf_counter() - start, by[0], by[1]))
    arr = np.array(rows)
    print(f"{'from s':>7} {'model A ms':>10} {'model B ms':>10} {'ratio':>6}")
    for lo in np.arange(0.0, args.seconds, args.bin):
        sel = (arr[:, 0] >= lo) & (arr[:, 0] < lo + args.bin)
        if sel.any():
            a, b = float(np.median(arr[sel, 1])), float(np.median(arr[sel, 2]))
            print(f"{lo:7.1f} {a:10.3f} {b:10.3f} {b / a:6.2f}")
    q = DECISION_QUANTILE
    print(f"ratio of medians {np.median(arr[:, 2]) / np.median(arr[:, 1]):.3f}; "
          f"of lower quartiles {np.quantile(arr[:, 2], q) / np.quantile(arr[:, 1], q):.3f}")


if __name__ == "__main__":
    main()
