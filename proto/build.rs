fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Use the vendored protoc so no system protobuf compiler is needed.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/journal.proto");
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&["proto/journal.proto"], &["proto"])?;
    Ok(())
}
