"""Will TensorRT's ONNX parser take this graph? An audit that needs neither TensorRT nor a GPU.

TensorRT cannot be installed on the machines that export bundles and run CI, so the first time
a graph meets the parser would otherwise be on a site's GPU host, after the bundle shipped.
This module checks what can be checked from the graph alone, against the parser's published
support matrix (onnx-tensorrt ``docs/operators.md``, the table for TensorRT 10.15, opset 9 to
24; TensorRT 11's parser keeps the same operator set):

- every node's operator is one the parser supports (domain ``ai.onnx``; custom domains need
  plugins, which a bundle never ships);
- the opset is at least 17 (``LayerNormalization``) and at most the parser's newest;
- the documented restrictions that a static graph can violate: reduction axes and
  (Un)Squeeze axes that are not constants, pooling that is not 2D or 3D, extra outputs of
  ``LayerNormalization``, ``TopK`` unsorted, training-mode ``Dropout``;
- element types TensorRT has (no strings, no complex, no unsigned wider than 8 bits);
- every graph input and output dimension is static, or a named dimension the caller declares
  (what a TensorRT optimisation profile would then pin).

``audit_onnx`` returns what is wrong instead of raising, so export can refuse a bundle with
the whole list and tests can assert on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = [
    "MAX_TENSORRT_OPSET",
    "MIN_OPSET",
    "TENSORRT_ONNX_OPS",
    "DynamicDim",
    "OnnxAudit",
    "audit_onnx",
]

MIN_OPSET: Final = 17
MAX_TENSORRT_OPSET: Final = 24

#: Operators (domain ai.onnx) the TensorRT ONNX parser supports: every row marked "Y" in
#: onnx-tensorrt docs/operators.md for TensorRT 10.15. Rows marked "N" (Bernoulli, BitShift,
#: Bitwise*, Col2Im, CenterCropPad, Compress, ConcatFromSequence, ConvInteger, DFT, Det,
#: DynamicQuantizeLinear, ImageDecoder, MatMulInteger, MaxRoiPool, MaxUnpool, MelWeightMatrix,
#: Multinomial, NegativeLogLikelihoodLoss, Optional*, QLinearConv, QLinearMatMul,
#: RegexFullMatch, Sequence*, SoftmaxCrossEntropyLoss, SplitToSequence, String*,
#: TfIdfVectorizer, Unique, AffineGrid) are left out on purpose.
TENSORRT_ONNX_OPS: Final[frozenset[str]] = frozenset(
    {
        "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan",
        "Atanh", "Attention", "AveragePool", "BatchNormalization", "BlackmanWindow", "Cast",
        "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
        "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace",
        "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand",
        "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm",
        "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual",
        "GridSample", "GroupNormalization", "GRU", "HammingWindow", "HannWindow",
        "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageScaler",
        "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less",
        "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN", "LSTM", "LpNormalization", "LpPool",
        "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mod",
        "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad",
        "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear", "RandomNormal",
        "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal",
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize",
        "ReverseSequence", "RMSNormalization", "RNN", "RoiAlign", "RotaryEmbedding", "Round",
        "STFT", "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu",
        "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax",
        "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan",
        "Tanh", "TensorScatter", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu",
        "Unsqueeze", "Upsample", "Where", "Xor",
    }
)  # fmt: skip

# onnx.TensorProto element types TensorRT can hold (DOUBLE is cast down to FLOAT by the
# parser; FP8/FP4/INT4 only through Q/DQ, which an fp32 export never has).
_TENSORRT_DTYPES: Final = frozenset(
    {"FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE", "INT32", "INT64", "INT8", "UINT8", "BOOL"}
)
_REDUCE_OPS: Final = frozenset(
    {
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
    }
)  # fmt: skip
_POOL_OPS: Final = frozenset({"AveragePool", "MaxPool", "LpPool"})


@dataclass(frozen=True)
class DynamicDim:
    """A graph input or output dimension that is not a fixed number and was not declared."""

    tensor: str
    axis: int
    name: str  # the dim_param ("" when the dimension is unknown altogether)

    def __str__(self) -> str:
        return f"{self.tensor}[{self.axis}]={self.name or '?'}"


@dataclass(frozen=True)
class OnnxAudit:
    """What stands between a graph and TensorRT's parser; ``ok`` when nothing does."""

    opset: int
    op_counts: Mapping[str, int]
    unsupported_ops: tuple[str, ...] = ()
    restrictions: tuple[str, ...] = ()
    dynamic_dims: tuple[DynamicDim, ...] = ()
    bad_dtypes: tuple[str, ...] = ()
    opset_problem: str | None = None
    io_shapes: Mapping[str, tuple[int | str, ...]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (
            self.unsupported_ops
            or self.restrictions
            or self.dynamic_dims
            or self.bad_dtypes
            or self.opset_problem
        )

    def problems(self) -> list[str]:
        """One line per problem, for logs and error messages."""
        out: list[str] = []
        if self.opset_problem:
            out.append(self.opset_problem)
        out += [f"operator {op} is not in TensorRT's ONNX parser" for op in self.unsupported_ops]
        out += list(self.restrictions)
        out += [f"dimension {d} is dynamic and not declared" for d in self.dynamic_dims]
        out += list(self.bad_dtypes)
        return out


def _load(model: Any) -> Any:
    import onnx

    if isinstance(model, str | Path):
        # Shapes and op types are all the audit reads: weights stay on disk.
        return onnx.load(str(model), load_external_data=False)
    return model


def _dims(value_info: Any) -> tuple[int | str, ...]:
    out: list[int | str] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        else:
            out.append(str(d.dim_param) if d.HasField("dim_param") else "")
    return tuple(out)


def _attr(node: Any, name: str) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def _constant_names(graph: Any) -> set[str]:
    """Tensors whose value is known when TensorRT builds: initializers and Constant outputs."""
    names = {t.name for t in graph.initializer}
    names |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return names


def _restrictions(graph: Any, constants: set[str]) -> list[str]:
    out: list[str] = []
    for n in graph.node:
        where = f"{n.op_type} node {n.name or n.output[0]!r}"
        if n.op_type in _REDUCE_OPS | {"Squeeze", "Unsqueeze"}:
            if len(n.input) > 1 and n.input[1] and n.input[1] not in constants:
                out.append(f"{where}: axes must be a constant for TensorRT")
        elif n.op_type in _POOL_OPS:
            kernel = _attr(n, "kernel_shape")
            if kernel is not None and len(kernel) not in (2, 3):
                out.append(f"{where}: TensorRT pools in 2D or 3D only, not {len(kernel)}D")
            dilations = _attr(n, "dilations")
            if dilations is not None and any(int(d) != 1 for d in dilations):
                out.append(f"{where}: TensorRT pools without dilation")
        elif n.op_type == "LayerNormalization":
            if sum(1 for o in n.output if o) > 1:
                out.append(f"{where}: TensorRT supports only the first output (Y)")
        elif n.op_type == "TopK":
            if _attr(n, "sorted") == 0:
                out.append(f"{where}: TensorRT needs sorted=1")
        elif n.op_type == "Dropout":
            mode = n.input[2] if len(n.input) > 2 else ""
            if mode and mode not in constants:
                out.append(f"{where}: training_mode must be a constant False")
    return out


def audit_onnx(
    model: Any,
    *,
    declared_dims: Mapping[str, int] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    supported_ops: Iterable[str] = TENSORRT_ONNX_OPS,
) -> OnnxAudit:
    """Audit an ONNX model (a path, or a loaded ``onnx.ModelProto``) for TensorRT.

    A symbolic dimension is fine when it is declared: by name in ``declared_dims`` (e.g. a
    batch dimension exported as ``"batch"`` that the caller fixes at 1), or by position in
    ``input_shapes`` (a bundle's ``[onnx] input_shapes``), which declares the symbol there for
    the outputs too. Any other non-numeric input or output dimension is reported. Subgraphs
    (If/Loop bodies) are audited too.
    """
    import onnx

    proto = _load(model)
    declared = dict(declared_dims or {})
    declared_at: set[tuple[str, int]] = set()
    for vi in proto.graph.input:
        shape = (input_shapes or {}).get(vi.name)
        for axis, (d, size) in enumerate(zip(_dims(vi), shape or (), strict=False)):
            if isinstance(d, str):
                declared_at.add((vi.name, axis))
                if d:
                    declared.setdefault(d, int(size))
    supported = frozenset(supported_ops)
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    opset_problem = None
    if opset < MIN_OPSET:
        opset_problem = f"opset {opset} < {MIN_OPSET} (LayerNormalization needs 17)"
    elif opset > MAX_TENSORRT_OPSET:
        opset_problem = f"opset {opset} > {MAX_TENSORRT_OPSET}, the newest TensorRT parses"

    counts: dict[str, int] = {}
    unsupported: set[str] = set()
    restrictions: list[str] = []
    bad_types: set[str] = set()

    def walk(graph: Any) -> None:
        constants = _constant_names(graph)
        restrictions.extend(_restrictions(graph, constants))
        for t in graph.initializer:
            name = onnx.TensorProto.DataType.Name(t.data_type)
            if name not in _TENSORRT_DTYPES:
                bad_types.add(f"initializer {t.name!r} has element type {name}")
        for n in graph.node:
            key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
            counts[key] = counts.get(key, 0) + 1
            if n.domain not in ("", "ai.onnx") or n.op_type not in supported:
                unsupported.add(key)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        walk(g)

    walk(proto.graph)

    dynamic: list[DynamicDim] = []
    io_shapes: dict[str, tuple[int | str, ...]] = {}
    for vi in [*proto.graph.input, *proto.graph.output]:
        io_shapes[vi.name] = dims = _dims(vi)
        elem = onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)
        if elem not in _TENSORRT_DTYPES:
            bad_types.add(f"graph tensor {vi.name!r} has element type {elem}")
        for axis, d in enumerate(dims):
            if isinstance(d, str) and not ((d and d in declared) or (vi.name, axis) in declared_at):
                dynamic.append(DynamicDim(vi.name, axis, d))

    return OnnxAudit(
        opset=int(opset),
        op_counts=dict(sorted(counts.items())),
        unsupported_ops=tuple(sorted(unsupported)),
        restrictions=tuple(restrictions),
        dynamic_dims=tuple(dynamic),
        bad_dtypes=tuple(sorted(bad_types)),
        opset_problem=opset_problem,
        io_shapes=io_shapes,
    )
