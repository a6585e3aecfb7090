//! End-to-end tests: real services (in-process or as processes), real mTLS, real databases.
//! One binary with modules keeps link time low.

// Helpers are shared by modules that each use a part of them.
#![allow(unreachable_pub, dead_code)]

mod harness;

mod adapter;
mod adapter_export;
mod adapter_retry;
mod audit;
mod bad_input;
mod bench;
mod certificates;
mod chaos;
mod claims;
mod compose;
mod connectors;
mod contract_end;
mod contract_end_not_found;
mod contract_package_changed;
mod contract_retry;
mod contracts_processor;
mod contracts_registry;
mod download;
mod dsrctl_cli;
mod dsrctl_due_soon;
mod durability;
mod erasure;
mod exports;
mod forgetting;
mod hostile;
mod lifecycle;
mod limits;
mod logs;
mod metrics;
mod mtls;
mod packages;
mod poison;
mod procaudit;
mod receipt_cli;
mod recipient_receipt;
mod replicas;
mod reports;
mod retention;
mod revocation_live;
mod rotation;
mod shutdown;
mod staged_retention;
mod store_conformance;
mod tracing;
mod transfer;
mod trust_domain;
mod validation;
