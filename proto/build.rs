//! Compiles `proto/tandem/v1/*.proto` with protox (a protobuf compiler written in Rust), so a
//! machine with only cargo builds the contract: no system `protoc` is needed.
//!
//! Besides the generated code, the encoded `FileDescriptorSet` (with source info, so that
//! reflection clients show the contract's comments) is written to
//! `$OUT_DIR/tandem_descriptor.bin`; `src/lib.rs` exposes it as `FILE_DESCRIPTOR_SET` for the
//! coordinator's gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/tandem/v1/tandem.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_files(protos)?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("tandem_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
