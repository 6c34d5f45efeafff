"""kiln.inspect (the optimiser's per-pass table as a dict) and kiln.build (an AOT library)."""

import ctypes
import shutil

import pytest

import kiln
from conftest import MLP, shared_model


def test_inspect_reports_every_pass():
    r = kiln.inspect(MLP)
    names = [p["name"] for p in r["passes"]]
    assert names and [p["index"] for p in r["passes"]] == list(range(1, len(names) + 1))
    for p in r["passes"]:
        assert p["time_s"] >= 0 and p["nodes_before"] >= 0 and isinstance(p["counters"], dict)
    assert sum(r["ops_before"].values()) == r["passes"][0]["nodes_before"]
    assert sum(r["ops_after"].values()) == r["passes"][-1]["nodes_after"]
    off = kiln.inspect(MLP, passes=f"-{names[0]}")
    assert names[0] in off["skipped"]


def test_inspect_bert_tiny_fuses_attention_and_norms():
    r = kiln.inspect(shared_model("bert_tiny"))
    assert "attention" in r["fused_ops"], r["fused_ops"]
    assert r["rule_hits"] and all(not k.startswith("egraph_") for k in r["rule_hits"])
    assert r["egraph"]["enodes"] > 0
    assert r["ops_after"].get("layer_norm", 0) + r["fused_ops"].get("layer_norm", 0) > 0
    assert sum(r["ops_after"].values()) < sum(r["ops_before"].values())


@pytest.mark.skipif(shutil.which("cc") is None, reason="kiln build links with cc")
def test_build_writes_a_loadable_library_and_header(tmp_path):
    lib = tmp_path / "libmlp.so"
    header = tmp_path / "mlp.h"
    r = kiln.build(MLP, lib, header=header)
    assert r["library"] == str(lib) and lib.is_file() and header.is_file()
    assert r["kernels"] >= 1
    assert "kiln_create" in header.read_text()
    ctypes.CDLL(str(lib))  # it loads
    with pytest.raises(ValueError, match="weights"):
        kiln.build(MLP, lib, weights="cloud")
