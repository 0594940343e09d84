"""Decide from the graph alone whether every output computed from the data keeps the samples apart.

`prove_samples_independent` proves, by dataflow over the main graph, that row i of every output computed
from the data depends on sample i alone, or names each node (or output) it cannot show that for, with the
reason. Every tensor is FREE (initializers, constants and what is computed from them or from the per-sample
shape) or BATCH (the samples on axis 0), and a node reading a BATCH tensor is accepted only by a rule for its
operator showing that it keeps the samples apart: elementwise and broadcasting ops whose constants cannot
line up with axis 0; normalizations, reductions, softmax, sorts and slices along other axes; inference-mode
BatchNormalization with constant statistics; convolutions and pools; MatMul/Gemm that do not contract the
batch axis; reshapes that keep it; ... It is an allowlist, not a list of known offenders: an operator without
a rule is refused, and so are control flow (If/Loop/Scan) over the data, custom-domain operators and random
ones, each node with its reason.

The batch size N is the one thing about the rest of the batch a graph can read without touching its values,
and a graph that computes with it (divides by it, branches on it, sizes a tensor by it) treats a sample
differently by the company it keeps. Size is refused outright. Shape from axis 0 is followed instead: N may
flow only through the shape operations PyTorch spells `x.view(x.size(0), -1)` with (Gather or Slice of the
shape's first entry, Unsqueeze/Squeeze, Cast to int64, Identity, and a Concat with N first and FREE entries
after it), into the leading entry of a Reshape of a tensor that carries the samples: the one whose shape was
read, or any other (every such tensor has the batch's N rows, graph inputs included, which share one batch).
That Reshape keeps each sample whole on its own row: with N rows of y's N·S elements, row i holds elements
i·S .. (i+1)·S - 1, sample i's. Any other use of N is refused as reading the batch size, naming the Shape
node and the use.

The engine (the dataflow pass) is `bn_export.sample_dataflow`; the operator rules, and the tables naming
them, are `bn_export.sample_rules`.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from bn_export.onnx_graph import GraphIndex
from bn_export.sample_dataflow import Dataflow
from bn_export.sample_rules import BATCH_SIZE_RULES, RANDOM, RULES


@dataclass(frozen=True)
class SampleIndependence:
    """The proof's outcome: `problems`, each naming a node (or an output) and why it cannot be shown to keep
    the samples apart, none when the proof holds; and how many operations on the data it `accepted`."""

    problems: tuple[str, ...]
    accepted: int

    @property
    def proved(self) -> bool:
        return not self.problems


def prove_samples_independent(model: onnx.ModelProto | GraphIndex) -> SampleIndependence:
    """Whether row i of every output of `model` computed from the data depends on sample i alone (see the
    module docstring); reads the graph only, runs nothing."""
    graph = model if isinstance(model, GraphIndex) else GraphIndex(model)
    flow = Dataflow(graph, RULES, BATCH_SIZE_RULES, RANDOM)
    problems = flow.run()
    return SampleIndependence(tuple(problems), flow.accepted)
