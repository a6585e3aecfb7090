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

/// Converts a protobuf timestamp to milliseconds since the Unix epoch (saturating). Nanos
/// outside 0 to 999,999,999 are clamped into it: a timestamp from outside is checked with
/// [`is_real_instant`] (or `dsrelay_runtime::identity::instant_violation`) first, which refuses
/// them.
pub fn millis_from_timestamp(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(ts.nanos.clamp(0, 999_999_999) / 1_000_000))
}

/// The first second of the year 2000, in seconds since the Unix epoch.
pub const EARLIEST_INSTANT_SECONDS: i64 = 946_684_800;

/// The last second of the year 9999, in seconds since the Unix epoch.
pub const LATEST_INSTANT_SECONDS: i64 = 253_402_300_799;

/// The largest `nanos` of a well-formed timestamp: one less than a second.
pub const MAX_TIMESTAMP_NANOS: i32 = 999_999_999;

/// Whether `ts`'s `nanos` are a fraction of a second, 0 to [`MAX_TIMESTAMP_NANOS`], as
/// `google.protobuf.Timestamp` requires (negative ones too are malformed, whatever the
/// seconds): any other would be clamped into it by [`millis_from_timestamp`], changing the
/// instant sent.
pub fn has_valid_nanos(ts: &prost_types::Timestamp) -> bool {
    (0..=MAX_TIMESTAMP_NANOS).contains(&ts.nanos)
}

/// Whether `ts` is a well-formed timestamp ([`has_valid_nanos`]) within the years 2000 to
/// 9999: a task's time, or a retention's end, outside them is no real date (and far enough
/// out its milliseconds saturate).
pub fn is_real_instant(ts: &prost_types::Timestamp) -> bool {
    has_valid_nanos(ts) && (EARLIEST_INSTANT_SECONDS..=LATEST_INSTANT_SECONDS).contains(&ts.seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64, nanos: i32) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds, nanos }
    }

    /// A nanos of two seconds was read as 999 ms of the same second, and the instant
    /// taken for a real one.
    #[test]
    fn an_instant_with_nanos_outside_a_second_is_no_real_instant() {
        for nanos in [0, 1, 999_999_999] {
            assert!(is_real_instant(&ts(2_000_000_000, nanos)), "{nanos}");
        }
        for nanos in [1_000_000_000, 2_000_000_000, i32::MAX, -1, i32::MIN] {
            assert!(!has_valid_nanos(&ts(2_000_000_000, nanos)), "{nanos}");
            assert!(!is_real_instant(&ts(2_000_000_000, nanos)), "{nanos}");
        }
        assert!(!is_real_instant(&ts(EARLIEST_INSTANT_SECONDS - 1, 0)));
        assert!(is_real_instant(&ts(
            LATEST_INSTANT_SECONDS,
            MAX_TIMESTAMP_NANOS
        )));
    }
}
