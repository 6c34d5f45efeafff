"""Writes examples/mlp: a small ONNX MLP (MatMul+Add+Relu+MatMul+Softmax, symbolic batch)
with one test case whose reference output is computed by numpy, independently of kiln.
Run with the repo's venv: .venv/bin/python examples/make_mlp.py"""
import os
import numpy as np
import onnx
from onnx import helper, numpy_helper, TensorProto

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mlp")
rng = np.random.default_rng(0)
w1 = rng.standard_normal((16, 32)).astype(np.float32) * 0.3
b1 = rng.standard_normal((32,)).astype(np.float32) * 0.1
w2 = rng.standard_normal((32, 4)).astype(np.float32) * 0.3
x = rng.standard_normal((3, 16)).astype(np.float32)

nodes = [
    helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1/MatMul"),
    helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1/Add"),
    helper.make_node("Relu", ["h1"], ["h2"], name="act/Relu"),
    helper.make_node("MatMul", ["h2", "w2"], ["logits"], name="fc2/MatMul"),
    helper.make_node("Softmax", ["logits"], ["probs"], name="head/Softmax", axis=-1),
]
graph = helper.make_graph(
    nodes, "mlp",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
    [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 4])],
    [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="kiln-examples")
onnx.checker.check_model(model)
os.makedirs(os.path.join(here, "test_data_set_0"), exist_ok=True)
onnx.save(model, os.path.join(here, "model.onnx"))

logits = np.maximum(x @ w1 + b1, 0) @ w2
e = np.exp(logits - logits.max(-1, keepdims=True))
probs = e / e.sum(-1, keepdims=True)
for name, arr, fname in [("x", x, "input_0.pb"), ("probs", probs.astype(np.float32), "output_0.pb")]:
    with open(os.path.join(here, "test_data_set_0", fname), "wb") as f:
        f.write(numpy_helper.from_array(arr, name).SerializeToString())
np.save(os.path.join(here, "x.npy"), x)
print("wrote", here)
