"""The ONNX operators TensorRT's ONNX parser supports, as published by NVIDIA; the readiness check reads it.

Source: the operator support matrix of onnx/onnx-tensorrt, ``docs/operators.md``, in the version whose header
reads "TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24" (looked up
2026-12-01). Every row marked ``Y`` is in ``SUPPORTED``, every row marked ``N`` in ``UNSUPPORTED``; an operator
in neither is not in the matrix at all (treated as unsupported). ``RESTRICTIONS`` keeps the rows'
restrictions that the exported graphs can actually run into, checked by trainer.tensorrt_readiness.
For TensorRT 8.6 (JetPack 5) the same document says it "supports operators up to Opset 17"; the 8.x
matrix is not kept here, so on 8.6 a graph that passes may still meet a narrower operator.
When updating: replace the sets from the newer matrix and the version line below, in one commit.
"""

from __future__ import annotations

SOURCE = "onnx/onnx-tensorrt docs/operators.md"
TENSORRT_VERSION = "10.15"
OPSET_RANGE = (9, 24)  # inclusive, TensorRT 10.15
OPSET_MAX_TENSORRT_8_6 = 17  # "TensorRT 8.6 supports operators up to Opset 17" (JetPack 5)

SUPPORTED = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "Attention",
    "AveragePool", "BatchNormalization", "BlackmanWindow", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat",
    "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv",
    "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand",
    "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool",
    "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GroupNormalization", "GRU",
    "HammingWindow", "HannWindow", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageScaler",
    "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log",
    "LogSoftmax", "Loop", "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "Mean",
    "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not",
    "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear", "RandomNormal",
    "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RMSNormalization", "RNN", "RoiAlign",
    "RotaryEmbedding", "Round", "STFT", "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu",
    "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign",
    "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "TensorScatter", "ThresholdedRelu",
    "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
})

UNSUPPORTED = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Col2Im",
    "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
    "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial",
    "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv",
    "QLinearMatMul", "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence",
    "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
})

# Restrictions of supported rows that an exported scorer can meet (the matrix's wording, shortened).
RESIZE_COORDINATE_MODES = frozenset({"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric",
                                     "align_corners"})
RESIZE_MODES = frozenset({"nearest", "linear"})
RESIZE_NEAREST_MODES = frozenset({"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"})
REDUCE_OPS_AXES_INITIALIZER = frozenset({"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                                         "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare"})
TOPK_MAX_K = 3840  # "K input must be less than 3840"; "sorted must be 1"
POOL_OPS_NO_DILATION = frozenset({"AveragePool", "MaxPool", "LpPool"})  # "dilations must be empty or all ones"
# "UINT8 is only supported as network input or output tensor types."
RESTRICTIONS = {
    "Resize": "coordinate_transformation_mode in " + ", ".join(sorted(RESIZE_COORDINATE_MODES))
              + "; mode nearest or linear; no antialias",
    "Reduce*": "axes must be an initializer",
    "TopK": f"sorted must be 1, K a constant below {TOPK_MAX_K}",
    "Pool": "dilations empty or all ones",
    "UINT8": "only as a network input or output",
}
