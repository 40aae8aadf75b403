//! Build script: links the guest at its guest-physical address with its own linker script.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let script = std::path::Path::new(&dir).join("guest.ld");
    let script = script.display();
    println!("cargo:rustc-link-arg-bins=-T{script}");
    // Static code (the workspace's relocation-model=static) at the script's fixed address.
    println!("cargo:rustc-link-arg-bins=--no-pie");
    println!("cargo:rerun-if-changed={script}");
}
