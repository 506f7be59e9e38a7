"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort


def check_and_run(model: onnx.ModelProto) -> tuple[str, str]:
    """('ok' or the checker's complaint, 'runs' or onnxruntime's complaint): onnx.checker
    with full_check, then one run on zeros (dynamic dims: batch 1, others 64)."""
    try:
        onnx.checker.check_model(model, full_check=True)
        checker = "ok"
    except Exception as exc:  # report, do not hide
        checker = f"FAIL {exc}"[:60]
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        i = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) else (1 if k == 0 else 64) for k, d in enumerate(i.shape)]
        sess.run(None, {i.name: np.zeros(shape, np.float32)})
        runs = "runs"
    except Exception as exc:
        runs = f"FAIL {exc}"[:60]
    return checker, runs
