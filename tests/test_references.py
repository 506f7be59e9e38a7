"""The refit's compact targets (onnxcompress.references): what is kept of a reference
output, channel selection after pruning, and a non-finite output."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnxcompress.references import make_target


def test_a_conv_target_keeps_its_sampled_positions_and_channel_sums() -> None:
    y = np.random.default_rng(0).standard_normal((2, 5, 4, 6)).astype(np.float32)
    t = make_target(helper.make_node("Conv", ["x", "w"], ["y"]), y, np.random.default_rng(1), positions=7)
    ni, oy, ox = t.where
    assert len(ni) == 14 and t.rows.shape == (14, 5) and t.finite
    np.testing.assert_array_equal(t.rows, y[ni, :, oy, ox])
    np.testing.assert_allclose(t.sums, y.sum(axis=(0, 2, 3)), rtol=1e-6)
    assert t.count == 2 * 4 * 6
    kept = t.kept((2, 2, 4, 6), np.array([1, 4]))
    np.testing.assert_array_equal(kept.rows, y[ni][:, [1, 4]][np.arange(14), :, oy, ox])
    np.testing.assert_allclose(kept.sums, t.sums[[1, 4]])
    assert t.kept((2, 5, 4, 5), None) is None  # a spatial change is not a channel selection


def test_a_matmul_target_keeps_every_row_and_selects_its_last_axis() -> None:
    y = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    t = make_target(helper.make_node("MatMul", ["x", "w"], ["y"]), y, np.random.default_rng(0), positions=1)
    np.testing.assert_array_equal(t.rows, y.reshape(6, 4))
    kept = t.kept((2, 3, 2), np.array([0, 3]))
    np.testing.assert_array_equal(kept.rows, y.reshape(6, 4)[:, [0, 3]])


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_a_nonfinite_reference_keeps_nothing_and_stays_not_finite(bad: float) -> None:
    """A layer whose reference holds NaN/Inf (found by the mutation fuzzer: flipped weight
    bytes) is left as it is by the refit; its target must survive channel selection."""
    y = np.ones((2, 4, 3, 3), np.float32)
    y[0, 1, 0, 0], y[1, 1, 0, 0] = bad, -bad  # inf − inf: numpy's "invalid value" in a sum
    with np.errstate(all="raise"):
        t = make_target(helper.make_node("Conv", ["x", "w"], ["y"]), y, np.random.default_rng(0), positions=4)
        kept = t.kept((2, 2, 3, 3), np.array([0, 3]))
    assert not t.finite and t.rows is None
    assert kept is not None and not kept.finite and kept.shape == (2, 2, 3, 3)
