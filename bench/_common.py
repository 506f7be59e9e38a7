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


def quantize_static_variant(path, calib, batch: int, activations: str = "uint8", method: str = "MinMax"):
    """onnxruntime.quantization.quantize_static, QDQ, per-channel int8 weights, on the
    calibration array ``calib`` in batches of ``batch``; ``activations`` uint8 or int8,
    ``method`` MinMax or Entropy. Where the per-channel model does not load (opset < 13)
    it is redone per tensor. Returns (model, seconds, note)."""
    import tempfile
    import time
    from pathlib import Path

    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    inp = onnx.load(str(path), load_external_data=False).graph.input[0].name
    act = QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = ({inp: calib[i : i + batch]} for i in range(0, len(calib), batch))

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.it, None)

    note = "per-channel"
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "q.onnx"
        kw = dict(quant_format=QuantFormat.QDQ, activation_type=act, weight_type=QuantType.QInt8,
                  calibrate_method=getattr(CalibrationMethod, method))
        t0 = time.perf_counter()
        try:
            quantize_static(str(path), str(dst), Reader(), per_channel=True, **kw)
            ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
        except Exception as exc:  # its per-channel output may not load (opset < 13)
            note = f"per-tensor (per-channel failed: {' '.join(str(exc).split())[:80]})"
            quantize_static(str(path), str(dst), Reader(), per_channel=False, **kw)
        seconds = time.perf_counter() - t0
        return onnx.load(str(dst)), seconds, note


def per_sample_cosine(ref: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cosine of each sample's output (axis 0) to the reference's."""
    a, b = ref.reshape(len(ref), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def eval_metrics(name: str, ref: np.ndarray, y: np.ndarray, labels: np.ndarray | None) -> dict:
    """Accuracy of outputs ``y`` against the fp32 outputs ``ref`` on an eval set: mean
    per-sample cosine always; top-1 against ``labels`` and top-1 agreement with fp32 for
    classifiers; captcha_det: recall of the fp32 detections (objectness > 0.3 kept > 0.3)
    and precision (the share of the output's detections that are fp32 detections);
    text_det: IoU of the ``p > 0.3`` text masks."""
    acc: dict = {"cosine": float(np.mean(per_sample_cosine(ref, y)))}
    if labels is not None:
        acc["top1"] = float((y.argmax(1) == labels).mean())
        acc["agreement"] = float((y.argmax(1) == ref.argmax(1)).mean())
    if name == "captcha_det":
        pos = ref[..., 4] > 0.3
        acc["recall"] = float((y[..., 4][pos] > 0.3).mean())
        acc["precision"] = float(pos[y[..., 4] > 0.3].mean()) if (y[..., 4] > 0.3).any() else 1.0
    if name == "text_det":
        ma, mb = ref > 0.3, y > 0.3
        acc["iou"] = float((ma & mb).sum() / max((ma | mb).sum(), 1))
    return acc


def run_batch(model: onnx.ModelProto) -> int:
    """Batch size the benchmarks feed ``model``: 1 where its first input's batch dimension
    is fixed at 1, else 8."""
    return 1 if model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1 else 8


def run_batched(model: onnx.ModelProto, x: np.ndarray, batch: int) -> np.ndarray:
    """The model's first output on ``x`` (fed to its first input) in batches of ``batch``."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {inp: x[i : i + batch]})[0] for i in range(0, len(x), batch)])

