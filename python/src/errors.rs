//! kiln's Python exceptions and the mapping of `kiln::Error` onto them: every error
//! crosses into Python as an exception carrying kiln's message, never as a panic.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::PyErr;

create_exception!(
    kiln,
    KilnError,
    PyException,
    "Base class of every error kiln raises; the message is kiln's own."
);
create_exception!(
    kiln,
    ModelError,
    KilnError,
    "The model could not be read, imported, verified, optimised or compiled."
);
create_exception!(
    kiln,
    UnsupportedOpError,
    ModelError,
    "The model uses ops kiln does not implement (the message lists every one)."
);
create_exception!(
    kiln,
    InputError,
    KilnError,
    "An input is missing, unknown, given twice, or of the wrong dtype or shape."
);
create_exception!(
    kiln,
    RunError,
    KilnError,
    "Running the model failed (an error inside an op at run time)."
);

/// The error and its causes on one line, leaving out a cause whose text its parent
/// already shows (as the CLI prints them).
pub fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !text.contains(&s) {
            text = format!("{text}: {s}");
        }
        cause = c.source();
    }
    text
}

/// The exception for a kiln error.
pub fn to_py(e: kiln::Error) -> PyErr {
    let msg = chain_text(&e);
    match &e {
        kiln::Error::Load(kiln_frontend::LoadError::Onnx(
            kiln_frontend::OnnxError::UnsupportedOps { .. },
        )) => UnsupportedOpError::new_err(msg),
        kiln::Error::Load(_)
        | kiln::Error::Optimise(_)
        | kiln::Error::DecodeStep(_)
        | kiln::Error::Compile { .. } => ModelError::new_err(msg),
        kiln::Error::MissingInput { .. }
        | kiln::Error::UnknownInput { .. }
        | kiln::Error::DuplicateInput { .. }
        | kiln::Error::BadInput { .. }
        | kiln::Error::Calibration { .. } => InputError::new_err(msg),
        kiln::Error::Run(_) => RunError::new_err(msg),
        // No such device or driver, and an approximation refused by its budget: neither is
        // the model's fault nor an input's.
        kiln::Error::Device { .. } | kiln::Error::Approx(_) => KilnError::new_err(msg),
    }
}
