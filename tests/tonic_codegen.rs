//! The generated gRPC code of the tonic example is committed (`examples/generated/orders.rs`), so
//! neither the example nor the library needs protoc or a build script. This test regenerates it
//! from `examples/proto/orders.proto` with protox (a pure-Rust protobuf compiler) and
//! tonic-prost-build, into a temporary directory, and fails if the committed file differs.
//!
//! After changing the proto, update the committed file with
//! `UPDATE_GENERATED=1 cargo test --features tonic-integration --test tonic_codegen`.

use std::path::Path;

#[test]
fn committed_orders_code_is_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let proto_dir = root.join("examples/proto");
    let committed = root.join("examples/generated/orders.rs");

    let fds = protox::compile(["orders.proto"], [&proto_dir]).expect("orders.proto compiles");
    let out = tempfile::tempdir().unwrap();
    tonic_prost_build::configure()
        .out_dir(out.path())
        .emit_rerun_if_changed(false)
        .compile_fds(fds)
        .expect("code generation succeeds");
    let fresh = std::fs::read_to_string(out.path().join("orders.rs")).unwrap();

    if std::env::var_os("UPDATE_GENERATED").is_some() {
        std::fs::write(&committed, &fresh).unwrap();
        return;
    }
    let current = std::fs::read_to_string(&committed).unwrap_or_default();
    assert!(
        current == fresh,
        "{} is out of date with examples/proto/orders.proto; regenerate it with \
         `UPDATE_GENERATED=1 cargo test --features tonic-integration --test tonic_codegen`",
        committed.display()
    );
}
