"""kiln.compile and Executable: metadata, runs against reference data, feeds in every
layout, outputs that own their memory, and many threads on one executable."""

import threading

import numpy as np
import pytest

import kiln
from conftest import MLP, shared_model, load_test_data

# Same tolerance the Rust model tests use against PyTorch's reference outputs.
TOLERANCE = 1e-4


def test_inputs_outputs_and_compile_time():
    exe = kiln.compile(str(MLP))
    assert [i.name for i in exe.inputs] == ["x"]
    x = exe.inputs[0]
    assert x.dtype == "float32"
    assert x.shape[-1] == 16 and isinstance(x.shape[0], (int, str))
    assert len(exe.outputs) == 1 and exe.outputs[0].dtype == "float32"
    assert exe.compile_time > 0.0 and exe.optimise_time <= exe.compile_time
    assert exe.backend == "jit" and exe.threads >= 1
    assert "Executable(" in repr(exe)


@pytest.mark.parametrize("backend", ["jit", "interp"])
def test_mlp_matches_its_test_data(backend):
    ins, outs = load_test_data(MLP)
    exe = kiln.compile(MLP, backend=backend)
    got = exe.run(ins)
    assert list(got) == [o.name for o in exe.outputs]
    (y,) = got.values()
    np.testing.assert_allclose(y, outs[0], rtol=TOLERANCE, atol=TOLERANCE)


def test_model_as_bytes_and_path_like():
    ins, outs = load_test_data(MLP)
    for model in (MLP.read_bytes(), MLP):
        (y,) = kiln.compile(model).run(ins).values()
        np.testing.assert_allclose(y, outs[0], rtol=TOLERANCE, atol=TOLERANCE)


def test_kir_text_as_bytes():
    src = b"""func @double(%x: f32[N, 3]) -> f32[N, 3] {
  %y = add %x, %x
  return %y
}
"""
    exe = kiln.compile(src)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(exe.run({"x": x})["y"], 2 * x)


def test_feeds_in_any_layout_give_the_same_result():
    ins, _ = load_test_data(MLP)
    exe = kiln.compile(MLP)
    x = ins["x"]
    (ref,) = exe.run({"x": x}).values()
    fortran = np.asfortranarray(x)
    strided = np.repeat(x, 2, axis=0)[::2]
    assert not strided.flags.c_contiguous
    unaligned = np.frombuffer(b"\0" + x.tobytes(), dtype=np.float32, offset=1).reshape(x.shape)
    for v in (fortran, strided, unaligned, x.tolist(), np.float32(1) * x):
        v = np.asarray(v, dtype=np.float32) if isinstance(v, list) else v
        (y,) = exe.run({"x": v}).values()
        np.testing.assert_array_equal(y, ref)


def test_outputs_own_their_memory():
    ins, _ = load_test_data(MLP)
    exe = kiln.compile(MLP)
    (a,) = exe.run(ins).values()
    keep = a.copy()
    a[...] = np.nan  # writable, and not kiln's buffer
    (b,) = exe.run(ins).values()
    np.testing.assert_array_equal(b, keep)
    assert a.flags.writeable and a.flags.c_contiguous


def test_one_executable_serves_many_threads():
    ins, outs = load_test_data(MLP)
    exe = kiln.compile(MLP)
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(ins["x"].shape).astype(np.float32)
        (want,) = exe.run({"x": x}).values()
        for _ in range(50):
            (y,) = exe.run({"x": x}).values()
            if not np.array_equal(y, want):
                errors.append(seed)
        (y,) = exe.run(ins).values()
        if not np.allclose(y, outs[0], rtol=TOLERANCE, atol=TOLERANCE):
            errors.append(seed)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_bert_tiny_matches_its_test_data():
    model = shared_model("bert_tiny")
    ins, outs = load_test_data(model)
    exe = kiln.compile(model)
    got = list(exe.run(ins).values())
    assert len(got) == len(outs)
    for g, o in zip(got, outs):
        np.testing.assert_allclose(g, o, rtol=TOLERANCE, atol=TOLERANCE)
