//! kiln-runtime: executables and the host API. Today it runs graphs on the reference interpreter.
