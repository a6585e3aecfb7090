//! The registry binary refuses, before it starts, a `[[recipients]]` entry with more receipt
//! keys than a processor takes with a transfer, exiting 64 as for its other configuration
//! errors.

use std::process::Command;

use dsrelay_runtime::signing::SigningKey;

/// A registry file in `dir` for a recipient with `keys` receipt keys: one current, the rest
/// split between previous and (future) revoked keys.
fn write_config(dir: &std::path::Path, keys: usize) -> std::path::PathBuf {
    for f in ["ca.pem", "registry.pem", "registry.key"] {
        std::fs::write(dir.join(f), "x").unwrap();
    }
    SigningKey::generate()
        .write(&dir.join("registry-signing.key"))
        .unwrap();
    let key = || format!("{:?}", SigningKey::generate().public_key().to_base64());
    let previous: Vec<String> = (0..(keys - 1) / 2).map(|_| key()).collect();
    let revoked: Vec<String> = (0..keys - 1 - previous.len())
        .map(|_| {
            format!(
                "{{ key = {}, revoked_at = \"2999-01-01T00:00:00Z\" }}",
                key()
            )
        })
        .collect();
    let text = format!(
        "identity_hash_key = \"test key\"\n\
         [tls]\nca = \"ca.pem\"\ncert = \"registry.pem\"\nkey = \"registry.key\"\n\
         [audit]\ncheckpoint_key = \"registry-signing.key\"\n\
         checkpoint_file = \"audit/checkpoints.jsonl\"\n\
         [[recipients]]\nname = \"new-bookkeeper\"\nendpoint = \"https://r.example:8443\"\n\
         identity = \"spiffe://bookkeeper.example/recipient\"\npublic_key = {}\n\
         previous_public_keys = [{}]\nrevoked_public_keys = [{}]\n",
        key(),
        previous.join(", "),
        revoked.join(", "),
    );
    let file = dir.join("registry.toml");
    std::fs::write(&file, text).unwrap();
    file
}

#[test]
fn a_recipient_with_more_than_sixteen_receipt_keys_exits_64_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(dir.path(), 17);
    let out = Command::new(env!("CARGO_BIN_EXE_dsrelay-registry"))
        .arg("--config")
        .arg(&file)
        .env_remove("DSRELAY_REGISTRY_CONFIG")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("invalid configuration"), "{stderr}");
    assert!(
        stderr.contains(
            "recipients[0]: recipient new-bookkeeper has 17 receipt keys (public_key, \
             previous_public_keys and revoked_public_keys), more than the 16 a processor takes"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("drop the oldest previous_public_keys"),
        "{stderr}"
    );
}
