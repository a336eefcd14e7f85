//! Test support for kiln's end-to-end tests.
