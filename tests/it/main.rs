//! The reconciler's integration tests, one binary: real PostgreSQL, the fake Kubernetes API
//! server of `testkit`, the library in-process and the real binary
//! (`CARGO_BIN_EXE_sandbox-reconciler`). One module per concern; `support` holds the helpers
//! that need the reconciler's own types (settings, sweeps, the binary).
//!
//! Run one module's tests with a filter, e.g. `cargo test --test it rules::`.

mod bad_input;
mod cache;
mod centaur;
mod cli;
mod daemon;
mod faults;
mod misconfig;
mod oncall;
mod operator;
mod partitions;
mod plan_props;
mod prometheus_e2e;
mod rules;
mod soak;
mod support;
mod sweep;
mod table_identity;
mod undo;
mod writer_lock;
