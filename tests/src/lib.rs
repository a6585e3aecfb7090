//! Workspace-level end-to-end tests for dsrelay live in this crate's `tests/e2e/`
//! (`tests/tests/e2e/` from the workspace root); this library is empty.
