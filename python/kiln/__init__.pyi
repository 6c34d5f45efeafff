import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

__version__: str

_Model = Union[str, bytes, "os.PathLike[str]"]

class KilnError(Exception):
    """Base class of every error kiln raises; the message is kiln's own."""

class ModelError(KilnError):
    """The model could not be read, imported, verified, optimised or compiled."""

class UnsupportedOpError(ModelError):
    """The model uses ops kiln does not implement (the message lists every one)."""

class InputError(KilnError):
    """An input is missing, unknown, given twice, or of the wrong dtype or shape."""

class RunError(KilnError):
    """Running the model failed (an error inside an op at run time)."""

class TensorInfo:
    """One input or output of a compiled model."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str:
        """numpy dtype name: float32, int64, ..."""
    @property
    def shape(self) -> Optional[List[Union[int, str, None]]]:
        """int for a fixed dim, str for a symbolic one, None for an unknown one."""
    @property
    def kiln_type(self) -> str:
        """kiln's spelling, e.g. f32[batch, 16]."""

class Executable:
    """A compiled model; thread-safe, runs with the GIL released."""

    @property
    def inputs(self) -> List[TensorInfo]: ...
    @property
    def outputs(self) -> List[TensorInfo]: ...
    @property
    def compile_time(self) -> float:
        """Seconds: optimisation plus code generation."""
    @property
    def optimise_time(self) -> float: ...
    @property
    def approx_report(self) -> Optional[Dict[str, Any]]:
        """What compile(approx=...) accepted (sites, errors, estimated speed-up, held-out
        error, and `text` as the CLI prints it), or None for an exact executable."""
    @property
    def backend(self) -> str: ...
    @property
    def threads(self) -> int: ...
    def run(self, feeds: Dict[str, npt.ArrayLike]) -> Dict[str, np.ndarray]:
        """Runs on every input by name; returns output name -> array, in output order."""
    def run_list(
        self, output_names: Optional[Sequence[str]], feeds: Dict[str, npt.ArrayLike]
    ) -> List[np.ndarray]:
        """Runs and returns the named outputs (all when None) as a list."""

def compile(
    model: _Model,
    threads: Optional[int] = None,
    opt_level: int = 1,
    backend: str = "jit",
    passes: str = "",
    approx: Any = None,
    max_error: Optional[float] = None,
    calibration: Any = None,
) -> Executable:
    """Loads and compiles a model (path, or bytes of ONNX / .kir text).

    backend: "jit" (Cranelift), "aot" (an LLVM-built shared library) or "interp" (the
    reference interpreter). passes: toggles such as "-saturate_egraph".

    approx: opt-in approximate rewrites, "FAMILY[=PARAMS],..." as `kiln run --approx`
    (e.g. "ffn-threshold=0.5"); needs max_error (relative L2 over every output) and
    calibration: a folder of test_data_set_* folders (ONNX test layout) or a list of
    feed dicts of representative inputs (Python never falls back to random inputs). The
    last third of the sets is held out for verification; a budget that cannot be met
    raises KilnError ("approximation refused"). What was accepted is in
    `Executable.approx_report`."""

def inspect(model: _Model, passes: str = "") -> Dict[str, Any]:
    """The optimiser's per-pass table: passes, skipped, total_time_s, rule_hits (per
    e-graph rule), egraph (eclasses, enodes, iterations), ops_before, ops_after, fused_ops."""

def build(
    model: _Model,
    output: Union[str, "os.PathLike[str]"],
    header: Optional[Union[str, "os.PathLike[str]"]] = None,
    weights: str = "embed",
    target_cpu: str = "native",
    opt_level: int = 1,
) -> Dict[str, Any]:
    """Compiles ahead of time into a shared library with a C ABI (LLVM), as `kiln build`."""

class NodeArg:
    name: str
    shape: Optional[List[Union[int, str, None]]]
    type: str

class SessionOptions:
    intra_op_num_threads: int
    inter_op_num_threads: int
    graph_optimization_level: Any
    def __init__(self) -> None: ...

class InferenceSession:
    def __init__(
        self,
        path_or_bytes: _Model,
        sess_options: Optional[SessionOptions] = None,
        providers: Optional[Sequence[Any]] = None,
        provider_options: Optional[Sequence[Any]] = None,
        **kwargs: Any,
    ) -> None: ...
    def get_inputs(self) -> List[NodeArg]: ...
    def get_outputs(self) -> List[NodeArg]: ...
    def get_overridable_initializers(self) -> List[NodeArg]: ...
    def get_providers(self) -> List[str]: ...
    def run(
        self,
        output_names: Optional[Sequence[str]],
        input_feed: Dict[str, npt.ArrayLike],
        run_options: Any = None,
    ) -> List[np.ndarray]: ...
    @property
    def executable(self) -> Executable: ...
