//! The rules on export files both receivers of the chunk protocol apply (the registry's
//! `ExportUploadService` and a recipient's `TransferReceiver`, `proto/dsrelay/v1/package.proto`):
//! the limits, the file name, the digests and checksums and the list of files that closes a
//! part. Each side adds its own rules on the other header fields.

use std::collections::HashSet;

use dsrelay_proto::v1::ExportFileHeader;

use crate::identity::FieldViolation;

/// Longest subprocessor name, file name, media type or category accepted (bytes).
pub const MAX_LABEL: usize = 128;
/// At most this many categories per file.
pub const MAX_CATEGORIES: usize = 64;
/// At most this many files per part.
pub const MAX_FILES_PER_PART: usize = 10_000;

/// `value` as one safe path or key component: ASCII letters, digits, `-`, `_` and a `.`
/// that does not lead stay; every other byte becomes `%XX`, so distinct names never share a
/// component and no name can climb out (`..`, `/`) or hide (a leading `.`). An empty name
/// becomes `%00`, as a name of one NUL byte does: the two share a component, which the
/// callers' names (validated request ids, subprocessor and certificate names, never empty
/// nor holding a NUL) never meet.
pub fn path_component(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for (i, b) in value.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push_str("%00");
    }
    out
}

/// A name used as a folder or file name: 1 to [`MAX_LABEL`] ASCII letters, digits, '.', '-'
/// and '_', not starting with '.' (so it is never `..`, nor a folder's own dot-file).
pub fn file_name_violation(field: &str, value: &str) -> Option<FieldViolation> {
    let ok = !value.is_empty()
        && value.len() <= MAX_LABEL
        && !value.starts_with('.')
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    (!ok).then(|| {
        FieldViolation::new(
            field,
            format!(
                "must be 1 to {MAX_LABEL} ASCII letters, digits, '.', '-' and '_', not \
                 starting with '.'"
            ),
        )
    })
}

/// The checksum an `UploadFileChunk` carries of its data (`chunk_crc32`): CRC-32 with the
/// IEEE polynomial, as zip and gzip compute it. A checksum, not a digest: it is there to catch
/// a chunk damaged on its way (TLS guards against tampering, and the file's SHA-256 is checked
/// once the file is whole), and at several GB/s it costs a small fraction of a SHA-256 pass,
/// which both ends of an upload already make over the whole file.
pub fn chunk_crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// Why a chunk whose `chunk_crc32` is `given` must be refused, or `None` when it matches
/// `data`. A sender built for the protocol before `chunk_crc32` (field 5) sends 0 there, since
/// it fills the SHA-256 of field 4 that is no longer read; the reason then says so, so that the
/// operator upgrading a mixed deployment knows what to fix.
pub fn chunk_crc32_mismatch(data: &[u8], given: u32) -> Option<String> {
    let crc = chunk_crc32(data);
    if crc == given {
        return None;
    }
    Some(if given == 0 {
        format!(
            "chunk_crc32 is not set: it must be the CRC-32 of the chunk's data ({crc:08x}); a \
             sender built for the earlier protocol sends chunk_sha256 instead, which is no \
             longer read"
        )
    } else {
        format!("chunk_crc32 {given:08x} does not match the CRC-32 of the chunk's data ({crc:08x})")
    })
}

/// Whether `s` is a SHA-256 as the protocol writes it: 64 lowercase hex digits.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Every rule the file list closing a part breaks: at most [`MAX_FILES_PER_PART`] files,
/// each valid by `header_violations` (called with its field prefix `files[i]`), naming the
/// part's request and subprocessor, no name twice.
pub fn part_files_violations(
    request_id: &str,
    subprocessor: &str,
    files: &[ExportFileHeader],
    header_violations: impl Fn(&str, &ExportFileHeader) -> Vec<FieldViolation>,
) -> Vec<FieldViolation> {
    let mut out = Vec::new();
    if files.len() > MAX_FILES_PER_PART {
        out.push(FieldViolation::new(
            "files",
            format!("at most {MAX_FILES_PER_PART}"),
        ));
    }
    let mut names = HashSet::new();
    for (i, f) in files.iter().enumerate().take(MAX_FILES_PER_PART) {
        let prefix = format!("files[{i}]");
        out.extend(header_violations(&prefix, f));
        if f.request_id != request_id || f.subprocessor != subprocessor {
            out.push(FieldViolation::new(
                prefix.clone(),
                "must name the part's request_id and subprocessor",
            ));
        }
        if !names.insert(f.name.as_str()) {
            out.push(FieldViolation::new(
                format!("{prefix}.name"),
                "is listed twice",
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_checksum_is_the_crc_32_of_zip_and_an_unset_one_is_named() {
        // The CRC-32 check value of the IEEE polynomial.
        assert_eq!(chunk_crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(chunk_crc32_mismatch(b"123456789", 0xcbf4_3926), None);
        let wrong = chunk_crc32_mismatch(b"123456789", 1).unwrap();
        assert!(
            wrong.contains("00000001") && wrong.contains("cbf43926"),
            "{wrong}"
        );
        let unset = chunk_crc32_mismatch(b"123456789", 0).unwrap();
        assert!(unset.contains("chunk_crc32 is not set"), "{unset}");
        assert!(unset.contains("chunk_sha256"), "{unset}");
    }
}
