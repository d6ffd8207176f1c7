//! Generates the gRPC code from `proto/` with protox (pure Rust), so no system
//! `protoc` is needed, and writes the descriptor set that gRPC reflection serves.
use std::{env, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/dblifecycle/v1/db_lifecycle.proto";
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("db_lifecycle_descriptor.bin"),
        fds.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
