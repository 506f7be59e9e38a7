"""Labels: judging a compressed model against the user's ground truth, where the user has it.

Without labels the budget judges agreement with the model as given: every changed answer
counts against it, also a change *to* the right answer. On a recognizer whose original
reads a near-tie class wrongly (a full-width colon for an ASCII one), every approximate
model that flips it is refused, though it reads the line better (docs/decisions/ctc.md).

With labels a change counts only where it moves the answer away from the label:

* a CTC output ([N, T, C] scores, string labels): a sample whose greedy decode changed
  counts by how much its edit distance to the label grew (0 where it did not), and as a
  changed line only where it grew;
* class scores ([N, C], integer labels): a sample counts as a flip only where the input
  model's top-1 was the label and the candidate's is not.

Harm is never offset by gains elsewhere (no netting of fixes against breaks), so the
criterion is never looser than "no sample got worse" at the same thresholds, and the
metrics keep their names (``ctc``, ``ctc_lines``, ``top1``) and thresholds.

String labels are read through the output's class table: class 0 is the CTC blank, class
k ≥ 1 the charset's k-th character, and where the output has one class more than that,
the last class is a space (PaddleOCR's convention). The charset is a UTF-8 file with one
character per line, or the model's ``character`` metadata (PaddleOCR exports carry it).
A label character outside the charset can never be decoded, so it costs both models
alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .ctc import edit_distance, greedy_decode
from .data.files import scan_array_file
from .errors import DataError, OptionError
from .metrics import is_class_scores

#: model metadata key that PaddleOCR exports use for their charset
CHARSET_METADATA = "character"


@dataclass(frozen=True)
class Labels:
    """One label per calibration (or validation) sample, in the data's sample order."""

    values: np.ndarray  # [N]: integer classes, or strings
    where: str  # the file and array, for messages
    charset: tuple[str, ...] | None = None
    _tables: dict[int, tuple[dict[str, int], np.ndarray]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def strings(self) -> bool:
        return self.values.dtype.kind in "US"

    def take(self, start: int, n: int) -> np.ndarray:
        """The labels of samples ``start`` … ``start + n − 1``."""
        if start + n > len(self.values):
            raise DataError(f"{self.where}: {len(self.values)} labels, but sample {start + n - 1} was asked for")
        return self.values[start:start + n]

    def fits(self, ref: np.ndarray, sequence: bool) -> bool:
        """Whether these labels judge an output with reference values ``ref`` (sample-major):
        strings a CTC sequence output, integers a class-score output."""
        if self.strings:
            return sequence and ref.ndim == 3
        return not sequence and is_class_scores(ref.shape)

    def _table(self, classes: int) -> tuple[dict[str, int], np.ndarray]:
        """For an output with ``classes`` classes: each character's class (a character listed
        twice: its first), and each class's first class with the same character (the blank
        itself). Checked and built once per class count."""
        if classes not in self._tables:
            if self.charset is None:
                raise OptionError(f"{self.where}: string labels need the output's characters: give a charset "
                                  f"(--charset FILE, one character per line) or a model with "
                                  f"'{CHARSET_METADATA}' metadata")
            n = len(self.charset)
            if classes not in (n + 1, n + 2):
                raise OptionError(f"charset: {n} characters, so the CTC output should have {n + 1} classes "
                                  f"(blank first) or {n + 2} (and a space last); it has {classes}")
            chars = list(self.charset) + [" "] * (classes - n - 1)  # class k reads chars[k - 1]
            table: dict[str, int] = {}
            for k, c in enumerate(chars, 1):
                table.setdefault(c, k)
            same = np.array([0] + [table[c] for c in chars], dtype=np.int64)
            self._tables[classes] = (table, same)
        return self._tables[classes]

    def encode(self, labels: np.ndarray, classes: int) -> list[np.ndarray]:
        """String labels as class-index sequences of an output with ``classes`` classes
        (unknown characters as −1, which no decode matches)."""
        table = self._table(classes)[0]
        return [np.array([table.get(c, -1) for c in str(s)], dtype=np.int64) for s in labels]

    def same_character(self, classes: int) -> np.ndarray:
        """[classes]: each class's first class with the same character (the blank itself), so
        that decodes compare with labels by character where a charset lists one twice."""
        return self._table(classes)[1]


def read_labels(data: object, key: str, model: onnx.ModelProto, charset: str | os.PathLike[str] | Sequence[str] | None,
                samples: int | None) -> Labels:
    """The array ``key`` of the ``.npz`` file ``data`` as labels of its ``samples`` samples."""
    if not isinstance(data, (str, os.PathLike)) or Path(data).suffix.lower() != ".npz" or not Path(data).is_file():
        raise OptionError(f"labels '{key}': labels are read from a .npz file beside the inputs; {data!s} is not one")
    entries = scan_array_file(Path(data))
    if key not in entries:
        raise DataError(f"{data}: no array '{key}' for the labels; the file holds "
                        f"{', '.join(repr(k) for k in entries)}")
    entry = entries[key]
    if key in {i.name for i in model.graph.input}:
        raise OptionError(f"labels '{key}': that is an input of the model, not labels")
    values = entry.read_all()
    if values.ndim != 1 or not (values.dtype.kind in "US" or np.issubdtype(values.dtype, np.integer)):
        raise DataError(f"{entry.where}: labels must be one integer class or one string per sample, "
                        f"found {values.dtype} {list(values.shape)}")
    if samples is not None and len(values) < samples:
        raise DataError(f"{entry.where}: {len(values)} labels for {samples} samples")
    return Labels(values, entry.where, _charset(charset, model) if values.dtype.kind in "US" else None)


def _charset(charset: str | os.PathLike[str] | Sequence[str] | None, model: onnx.ModelProto) -> tuple[str, ...] | None:
    if charset is None:
        meta = {p.key: p.value for p in model.metadata_props}
        return tuple(meta[CHARSET_METADATA].split("\n")) if CHARSET_METADATA in meta else None
    if isinstance(charset, (str, os.PathLike)):
        path = Path(charset)
        if not path.is_file():
            raise OptionError(f"charset {path}: no such file")
        return tuple(path.read_text(encoding="utf-8").splitlines())
    return tuple(charset)


def sequence_harm(ref: np.ndarray, new: np.ndarray, targets: list[np.ndarray],
                  same: np.ndarray | None = None) -> tuple[int, int, list[bool]]:
    """For two [N, T, C] score arrays and each sample's label: (characters by which the
    changed decodes moved away from their labels, in all; the reference decodes' summed
    length; per sample, whether its decode got worse). ``same``: the class each class
    reads as (:meth:`Labels.same_character`)."""
    worse_by = length = 0
    worse: list[bool] = []
    for a, b, t in zip(greedy_decode(ref), greedy_decode(new), targets):
        if same is not None:
            a, b = same[a], same[b]
        length += len(a)
        grew = 0
        if not (len(a) == len(b) and np.array_equal(a, b)):
            grew = max(0, edit_distance(b, t) - edit_distance(a, t))
        worse_by += grew
        worse.append(grew > 0)
    return worse_by, length, worse


def class_harm(ref_top: np.ndarray, new_top: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per sample: the candidate keeps the label where the input model had it (True), or
    the input model had it wrong anyway."""
    return ~((ref_top == targets) & (new_top != targets))
