//! Shared helpers for kiln integration tests.
