"""Every failure is a kiln.KilnError subclass carrying kiln's message; nothing panics."""

import numpy as np
import pytest

import kiln
from conftest import MLP


def test_bad_model_bytes_and_paths():
    with pytest.raises(kiln.ModelError, match="malformed ONNX"):
        kiln.compile(b"\x08\x07\x12\xff\xff\xff")
    with pytest.raises(kiln.ModelError, match="cannot read"):
        kiln.compile("/nonexistent/model.onnx")
    with pytest.raises(TypeError):
        kiln.compile(42)


def test_text_form_errors_name_the_line_and_the_node():
    with pytest.raises(kiln.ModelError, match="layer_norm"):
        kiln.compile(
            b"func @f(%x: f32[2, 4]) -> f32[2, 4] {\n"
            b"  %n = layer_norm %x {axis = -1, epsilon = 1e-5}\n"
            b"  return %n\n}\n"
        )


def test_unsupported_ops_are_listed():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    node = helper.make_node("FancyNewOp", ["x"], ["y"], domain="")
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(kiln.UnsupportedOpError, match="FancyNewOp") as e:
        kiln.compile(m.SerializeToString())
    assert isinstance(e.value, kiln.ModelError) and isinstance(e.value, kiln.KilnError)


def test_bad_inputs_name_the_input():
    exe = kiln.compile(MLP)
    x = np.zeros((2, 16), np.float32)
    with pytest.raises(kiln.InputError, match="missing input `x`"):
        exe.run({})
    with pytest.raises(kiln.InputError, match="unknown input `y`"):
        exe.run({"x": x, "y": x})
    with pytest.raises(kiln.InputError, match="input `x`.*dtype"):
        exe.run({"x": x.astype(np.float64)})
    with pytest.raises(kiln.InputError, match="dim 1 is 15"):
        exe.run({"x": np.zeros((2, 15), np.float32)})
    with pytest.raises(kiln.InputError, match="no kiln dtype"):
        exe.run({"x": np.zeros((2, 16), np.complex64)})
    with pytest.raises(kiln.InputError, match="no kiln dtype"):
        exe.run({"x": x.astype(">f4")})
    with pytest.raises(TypeError):
        exe.run([x])


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown backend"):
        kiln.compile(MLP, backend="tpu")
    with pytest.raises(ValueError, match="opt_level"):
        kiln.compile(MLP, opt_level=3)
    with pytest.raises(kiln.ModelError, match="unknown pass"):
        kiln.compile(MLP, passes="-no_such_pass")
    with pytest.raises(ValueError, match="error budget"):
        kiln.compile(MLP, approx="fast")
    with pytest.raises(ValueError, match="only with approx"):
        kiln.compile(MLP, max_error=0.1)
    with pytest.raises(ValueError, match="calibration inputs"):
        kiln.compile(MLP, approx="ffn-threshold", max_error=0.1)
    with pytest.raises(ValueError, match="finite"):
        kiln.compile(MLP, approx="ffn-threshold", max_error=-1.0, calibration=[])
