//! The dsrelay v1 wire protocol, generated from `proto/dsrelay/v1/*.proto`.
//!
//! Both services and every client depend on this crate and use the `tonic` it re-exports,
//! so the whole workspace speaks through one version of the generated code.
//!
//! # Layout
//! - [`v1`]: messages, enums, clients and servers of package `dsrelay.v1`.
//! - [`FILE_DESCRIPTOR_SET`]: the compiled descriptors, served through gRPC reflection.
//! - [`codec`]: the protobuf codec of the generated code (undecodable bytes are
//!   INVALID_ARGUMENT).

pub mod codec;

pub use prost;
pub use prost_types;
pub use tonic;

/// Package `dsrelay.v1`.
#[allow(missing_docs, clippy::all, unreachable_pub)]
pub mod v1 {
    tonic::include_proto!("dsrelay.v1");
}

/// The encoded `FileDescriptorSet` of every dsrelay proto file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dsrelay_descriptor");

/// Converts milliseconds since the Unix epoch to a protobuf timestamp.
pub fn timestamp_from_millis(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// Converts a protobuf timestamp to milliseconds since the Unix epoch (saturating).
pub fn millis_from_timestamp(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(ts.nanos.clamp(0, 999_999_999) / 1_000_000))
}

/// The first second of the year 2000, in seconds since the Unix epoch.
pub const EARLIEST_INSTANT_SECONDS: i64 = 946_684_800;

/// The last second of the year 9999, in seconds since the Unix epoch.
pub const LATEST_INSTANT_SECONDS: i64 = 253_402_300_799;

/// Whether `ts` falls within the years 2000 to 9999: a task's time, or a retention's end,
/// outside them is no real date (and far enough out its milliseconds saturate).
pub fn is_real_instant(ts: &prost_types::Timestamp) -> bool {
    (EARLIEST_INSTANT_SECONDS..=LATEST_INSTANT_SECONDS).contains(&ts.seconds)
}
