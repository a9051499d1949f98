//! Proves that the fake Kubernetes API server (`testkit::fake_api`) answers the real
//! `kube::Client` the way a real API server would: pagination, selectors, metadata-only
//! content negotiation, Status errors, RBAC, Namespaces and the cluster's identity, fault
//! injection and request recording, watches (replay from a resourceVersion, 410 for a
//! compacted one, bookmarks, selectors, metadata-only events, broken streams) and the cached
//! encoding of list pages.
//!
//! One module per topic; `support` holds the helpers they share. Run one topic with a filter,
//! e.g. `cargo test -p testkit --test fake_api_conformance watch::`.

mod client;
mod errors;
mod faults;
mod lists;
mod namespaces;
mod support;
mod watch;
mod watch_streams;
