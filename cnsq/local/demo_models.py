"""Small ONNX models built on the spot (no weights to download).

- :func:`water_classifier`: the demo's model, a rule written in ONNX operators: the share of
  pixels whose blue channel exceeds both red and green by a margin, squashed into
  ``[p_land, p_water]``. Honest and inspectable: it is not a trained network.
- :func:`benchmark_cnn`: a small convolutional network with random weights, whose inference
  costs a few milliseconds per tile on a CPU, for the serve and pipeline benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnsq.errors import CnsqError


def _onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:  # pragma: no cover - the local extra is missing

        raise CnsqError("the one-machine pipeline needs its extra: pip install 'cnsq[local]'") \
            from exc
    return onnx, TensorProto, helper, numpy_helper


def _save(model, path: Path) -> Path:
    onnx, *_ = _onnx()
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def water_classifier(path: Path, size: int = 64, margin: float = 20.0,
                     water_share: float = 0.25, steepness: float = 40.0) -> Path:
    """Write the demo's water classifier: uint8 NHWC images of ``size``² → [N, 2] scores."""
    onnx, tp, helper, numpy_helper = _onnx()

    def const(name: str, value) -> object:
        return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)

    def index(name: str, value: int) -> object:
        return numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)

    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=tp.FLOAT),
        helper.make_node("Gather", ["pixels", "i0"], ["red"], axis=3),
        helper.make_node("Gather", ["pixels", "i1"], ["green"], axis=3),
        helper.make_node("Gather", ["pixels", "i2"], ["blue"], axis=3),
        helper.make_node("Max", ["red", "green"], ["other"]),
        helper.make_node("Sub", ["blue", "other"], ["excess"]),
        helper.make_node("Greater", ["excess", "margin"], ["is_water"]),
        helper.make_node("Cast", ["is_water"], ["water_pixels"], to=tp.FLOAT),
        helper.make_node("ReduceMean", ["water_pixels"], ["share"], axes=[1, 2], keepdims=0),
        helper.make_node("Sub", ["share", "water_share"], ["centred"]),
        helper.make_node("Mul", ["centred", "steepness"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["p_water"]),
        helper.make_node("Sub", ["one", "p_water"], ["p_land"]),
        helper.make_node("Unsqueeze", ["p_land", "axis1"], ["land_col"]),
        helper.make_node("Unsqueeze", ["p_water", "axis1"], ["water_col"]),
        helper.make_node("Concat", ["land_col", "water_col"], ["scores"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "water_classifier",
        [helper.make_tensor_value_info("image", tp.UINT8, ["N", size, size, 3])],
        [helper.make_tensor_value_info("scores", tp.FLOAT, ["N", 2])],
        [index("i0", 0), index("i1", 1), index("i2", 2), const("margin", margin),
         const("water_share", water_share), const("steepness", steepness), const("one", 1.0),
         numpy_helper.from_array(np.asarray([1], dtype=np.int64), "axis1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="cnsq")
    model.ir_version = 8
    return _save(model, path)


def benchmark_cnn(path: Path, size: int = 256, seed: int = 0) -> Path:
    """Write a random-weight CNN for benchmarks: float NCHW ``size``² images → [N, 2] softmax.

    Four strided convolutions, then a fully connected head of about 270 MB of weights: at batch 1
    that head is bound by memory bandwidth — a fixed cost per call, like a GPU call's — which is
    what dynamic batching amortises. A few milliseconds per tile on a 2-core CPU.
    """
    onnx, tp, helper, numpy_helper = _onnx()
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int, scale: float = 0.05):
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name)

    channels = [3, 32, 64, 128, 256]
    nodes = [helper.make_node("Div", ["image", "scale"], ["x0"])]
    initializers = [numpy_helper.from_array(np.asarray(255.0, dtype=np.float32), "scale")]
    for i in range(4):
        nodes += [
            helper.make_node("Conv", [f"x{i}", f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[3, 3],
                             strides=[2, 2], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"x{i + 1}"]),
        ]
        initializers += [weight(f"w{i}", channels[i + 1], channels[i], 3, 3),
                         weight(f"b{i}", channels[i + 1])]
    features = channels[-1] * (size // 16) ** 2
    nodes += [
        helper.make_node("Flatten", ["x4"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["hidden"], transB=1),
        helper.make_node("Relu", ["hidden"], ["h"]),
        helper.make_node("Gemm", ["h", "out", "outb"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=1),
    ]
    initializers += [weight("fc", 1024, features, scale=0.002), weight("fcb", 1024),
                     weight("out", 2, 1024), weight("outb", 2)]
    graph = helper.make_graph(
        nodes, "benchmark_cnn",
        [helper.make_tensor_value_info("image", tp.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("scores", tp.FLOAT, ["N", 2])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="cnsq")
    model.ir_version = 8
    return _save(model, path)
