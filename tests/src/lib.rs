//! Workspace-level end-to-end tests for dsrelay live in `tests/e2e/`; this library is empty.
