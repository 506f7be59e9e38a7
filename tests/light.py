"""The onnx package's 'light' model architectures with real (seeded random) weights.

Their weights are ``ConstantOfShape`` outputs (all 0.02) and some are listed as graph
inputs; ``realize`` replaces each weight with a seeded random initializer of its shape
(He-normal for filters, positive variances and scales for BatchNormalization) so that
channels differ and pruning decisions are meaningful.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

LIGHT = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"
NAMES = ["resnet50", "densenet121", "inception_v1", "inception_v2", "shufflenet", "squeezenet"]


def realize(name: str, seed: int = 0) -> onnx.ModelProto:
    m = onnx.load(str(LIGHT / f"light_{name}.onnx"))
    rng = np.random.default_rng(seed)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    keep_nodes, new_inits = [], []
    for n in g.node:
        if n.op_type == "ConstantOfShape" and n.input[0] in inits:
            shape = tuple(int(v) for v in numpy_helper.to_array(inits[n.input[0]]))
            lname = n.output[0].lower()
            if any(k in lname for k in ("var", "riv")):
                arr = rng.uniform(0.5, 1.5, shape)
            elif any(k in lname for k in ("scale", "bn_s", "_s_0", "gamma")) and len(shape) == 1:
                arr = rng.uniform(0.5, 1.5, shape)
            elif len(shape) >= 2:
                fan_in = int(np.prod(shape[1:]))
                arr = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
            else:
                arr = rng.standard_normal(shape) * 0.1
            new_inits.append(numpy_helper.from_array(arr.astype(np.float32), n.output[0]))
        else:
            keep_nodes.append(n)
    del g.node[:]
    g.node.extend(keep_nodes)
    g.initializer.extend(new_inits)
    names = {t.name for t in g.initializer}
    real_inputs = [i for i in g.input if i.name not in names]
    del g.input[:]
    g.input.extend(real_inputs)
    m.ir_version = max(m.ir_version, 4)
    used = {i for n in g.node for i in n.input}
    live = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    return m
