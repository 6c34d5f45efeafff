"""kiln: a neural-network graph compiler, from Python.

    import kiln
    exe = kiln.compile("model.onnx")            # path or bytes; ONNX or .kir text
    outs = exe.run({"x": x})                    # dict name -> numpy array

or, for code written against ONNX Runtime, change one import:

    sess = kiln.InferenceSession("model.onnx")  # instead of onnxruntime.InferenceSession
    (y,) = sess.run(None, {"x": x})

Inputs are used in place (no copy) when their dtype is one the model takes and they are
C-contiguous; outputs are numpy arrays that own their memory. The GIL is released while a
model compiles or runs, and one Executable (or session) serves many threads at once.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Union

from ._kiln import (
    Executable,
    InputError,
    KilnError,
    ModelError,
    RunError,
    TensorInfo,
    UnsupportedOpError,
    __version__,
    build,
    compile,
    inspect,
)

__all__ = [
    "compile",
    "inspect",
    "build",
    "Executable",
    "TensorInfo",
    "InferenceSession",
    "SessionOptions",
    "NodeArg",
    "KilnError",
    "ModelError",
    "UnsupportedOpError",
    "InputError",
    "RunError",
    "__version__",
]

# numpy dtype name -> ONNX Runtime's type string.
_ORT_TYPES = {
    "float32": "tensor(float)",
    "float64": "tensor(double)",
    "float16": "tensor(float16)",
    "int8": "tensor(int8)",
    "int16": "tensor(int16)",
    "int32": "tensor(int32)",
    "int64": "tensor(int64)",
    "uint8": "tensor(uint8)",
    "uint16": "tensor(uint16)",
    "uint32": "tensor(uint32)",
    "uint64": "tensor(uint64)",
    "bool": "tensor(bool)",
}


class NodeArg:
    """An input or output as ONNX Runtime describes it: `.name`, `.shape` (ints for fixed
    dims, strings for symbolic ones, None for unknown ones) and `.type` (`tensor(float)`)."""

    __slots__ = ("name", "shape", "type")

    def __init__(self, info: TensorInfo) -> None:
        self.name: str = info.name
        self.shape: Optional[List[Union[int, str, None]]] = (
            None if info.shape is None else list(info.shape)
        )
        self.type: str = _ORT_TYPES[info.dtype]

    def __repr__(self) -> str:
        return f"NodeArg(name='{self.name}', type='{self.type}', shape={self.shape})"


class SessionOptions:
    """What kiln reads of ONNX Runtime's SessionOptions: `intra_op_num_threads` (0 = one
    per core) and `graph_optimization_level` (ORT_DISABLE_ALL, i.e. 0, compiles the graph
    as imported; anything else runs kiln's optimiser). Other attributes are accepted and
    ignored."""

    def __init__(self) -> None:
        self.intra_op_num_threads: int = 0
        self.inter_op_num_threads: int = 0
        self.graph_optimization_level: Any = 99


def _opt_level(level: Any) -> int:
    # ORT's GraphOptimizationLevel enum compares as an int (ORT_DISABLE_ALL == 0).
    try:
        return 0 if int(level) == 0 else 1
    except (TypeError, ValueError):
        return 0 if str(level).endswith("DISABLE_ALL") else 1


class InferenceSession:
    """A drop-in for `onnxruntime.InferenceSession` on kiln's JIT.

    What differs from ONNX Runtime:
    - `providers` is accepted for compatibility; kiln runs on the CPU whatever it names
      (`get_providers()` says `["KilnJITExecutionProvider"]`).
    - `run_options`, IO binding, `run_with_ort_values` and profiling are not provided.
    - Inputs must already have the dtype the model takes (as ORT requires); kiln does not
      cast. bfloat16 outputs come back as float32 (numpy has no bfloat16).
    - Errors are `kiln.KilnError` subclasses (`InputError` for bad feeds, `ModelError` /
      `UnsupportedOpError` when loading), not ORT's exception types.
    """

    def __init__(
        self,
        path_or_bytes: Union[str, bytes, "os.PathLike[str]"],
        sess_options: Optional[SessionOptions] = None,
        providers: Optional[Sequence[Any]] = None,
        provider_options: Optional[Sequence[Any]] = None,
        **kwargs: Any,
    ) -> None:
        threads = None
        opt_level = 1
        if sess_options is not None:
            threads = getattr(sess_options, "intra_op_num_threads", 0) or None
            opt_level = _opt_level(getattr(sess_options, "graph_optimization_level", 99))
        self._providers = list(providers) if providers else []
        self._exe = compile(path_or_bytes, threads=threads, opt_level=opt_level)
        self._inputs = [NodeArg(i) for i in self._exe.inputs]
        self._outputs = [NodeArg(o) for o in self._exe.outputs]
        self._run = self._exe.run_list

    def get_inputs(self) -> List[NodeArg]:
        return list(self._inputs)

    def get_outputs(self) -> List[NodeArg]:
        return list(self._outputs)

    def get_overridable_initializers(self) -> List[NodeArg]:
        return []

    def get_providers(self) -> List[str]:
        return ["KilnJITExecutionProvider"]

    def run(
        self,
        output_names: Optional[Sequence[str]],
        input_feed: Dict[str, Any],
        run_options: Any = None,
    ) -> List[Any]:
        """Runs the model; returns the outputs named in `output_names` (every output when
        None or empty) as a list of numpy arrays."""
        return self._run(list(output_names) if output_names else None, input_feed)

    @property
    def executable(self) -> Executable:
        """The kiln Executable behind the session."""
        return self._exe
