//! Configured callers outside the trust domain, or whose identity names another role, keep
//! a service from starting, with the key and identity named.

use std::time::Duration;

use crate::harness::{binary, spawn_pair, PairOptions, Role, Service};

/// Starts `binary_name` with a copy of `service`'s configuration where `from` is replaced by
/// `to` (and the listen address freed), and returns what it printed; it must exit non-zero.
async fn refused_start(
    dir: &std::path::Path,
    service: &Service,
    binary_name: &str,
    from: &str,
    to: &str,
) -> String {
    let text = std::fs::read_to_string(service.config_file()).expect("config");
    let listen = format!("listen = \"{}\"", service.addr());
    assert!(text.contains(&listen) && text.contains(from), "{text}");
    let copy = dir.join(format!("{binary_name}-foreign.toml"));
    let changed = text
        .replace(&listen, "listen = \"127.0.0.1:0\"")
        .replace(from, to);
    std::fs::write(&copy, changed).expect("copy");
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(binary(binary_name))
            .arg("--config")
            .arg(&copy)
            .env("RUST_LOG", "error")
            .output(),
    )
    .await
    .expect("the service exits")
    .expect("running the service");
    assert!(!out.status.success(), "{out:?}");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn callers_from_another_trust_domain_or_role_keep_the_services_from_starting() {
    let pair = spawn_pair(PairOptions {
        down: vec![Role::Registry, Role::Processor],
        ..Default::default()
    })
    .await
    .expect("sqlite pair");

    let log = refused_start(
        pair.dir(),
        &pair.registry,
        "dsrelay-registry",
        "spiffe://dsrelay.dev/partner/crm",
        "spiffe://elsewhere.example/partner/crm",
    )
    .await;
    assert!(
        log.contains("identity spiffe://elsewhere.example/partner/crm is in trust domain elsewhere.example, not dsrelay.dev"),
        "{log}"
    );

    // The controller's registry listed under a partner's identity: right domain, wrong role.
    let log = refused_start(
        pair.dir(),
        &pair.processor,
        "dsrelay-processor",
        "spiffe://dsrelay.dev/registry/controller",
        "spiffe://dsrelay.dev/partner/controller",
    )
    .await;
    assert!(
        log.contains("controllers[0].identity: identity spiffe://dsrelay.dev/partner/controller must name its role")
            && log.contains("spiffe://dsrelay.dev/registry/<name>"),
        "{log}"
    );
    pair.stop().await;
}
