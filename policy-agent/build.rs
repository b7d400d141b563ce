//! Builds the eBPF object (policy-ebpf, on the nightly toolchain, through
//! aya-build) so that a plain `cargo build` yields one binary with the object
//! embedded, as in aya-template.

use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Where `cargo xtask setup` installs bpf-linker (see xtask/src/setup.rs).
fn tools_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = env::var_os("POLICY_TOOLS_DIR") {
        return Some(PathBuf::from(dir).join("bpf-linker/bin"));
    }
    let home = env::var_os("HOME")?;
    Some(PathBuf::from(home).join(".cache/policy-dataplane/bpf-linker/bin"))
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=POLICY_TOOLS_DIR");
    // Make the project's own bpf-linker visible to the nested nightly cargo
    // when the user has not put it on PATH.
    if let Some(dir) = tools_bin_dir().filter(|d| d.join("bpf-linker").exists()) {
        let path = env::var_os("PATH").unwrap_or_default();
        let joined = env::join_paths(std::iter::once(dir).chain(env::split_paths(&path)))
            .context("PATH contains an invalid entry")?;
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { env::set_var("PATH", joined) };
    }

    let cargo_metadata::Metadata { packages, .. } =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "policy-ebpf")
        .ok_or_else(|| anyhow!("policy-ebpf package not found"))?;
    let cargo_metadata::Package { name, manifest_path, .. } = ebpf_package;
    let ebpf_package = aya_build::Package {
        name: name.as_str(),
        root_dir: manifest_path
            .parent()
            .ok_or_else(|| anyhow!("no parent for {manifest_path}"))?
            .as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf_package], Toolchain::default()).context(
        "building the eBPF object failed - run `cargo xtask setup` to install the nightly \
         rust-src component and bpf-linker",
    )
}
