//! Compiles `dsrelay/v1/*.proto` with protox (pure Rust), so no system `protoc` is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "dsrelay/v1/common.proto",
        "dsrelay/v1/registry.proto",
        "dsrelay/v1/processor.proto",
        "dsrelay/v1/adapter.proto",
        "dsrelay/v1/package.proto",
        "dsrelay/v1/transfer.proto",
        "dsrelay/v1/certificate.proto",
        "dsrelay/v1/contract.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Kept for server reflection; compile_fds does not write it itself.
    std::fs::write(
        out.join("dsrelay_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Undecodable requests are the caller's error, not the service's (see `codec.rs`).
        .codec_path("crate::codec::DsrelayCodec")
        // An uploaded chunk's bytes are taken from the received buffer as they are, not copied
        // into a Vec of their own: a package passes through the registry a MiB at a time.
        .bytes(".dsrelay.v1.UploadFileChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
