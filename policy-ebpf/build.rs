use which::which;

/// Rebuild the object when bpf-linker changes (as the aya template does):
/// cargo does not know the linker is an input.
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
