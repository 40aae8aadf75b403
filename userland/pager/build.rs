//! Build script: links the program with the shared user-level linker script.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let script = std::path::Path::new(&dir).join("../user.ld");
    let script = script.display();
    println!("cargo:rustc-link-arg-bins=-T{script}");
    // Position-independent code, linked at the script's fixed address: no run-time relocation.
    println!("cargo:rustc-link-arg-bins=--no-pie");
    println!("cargo:rerun-if-changed={script}");
}
