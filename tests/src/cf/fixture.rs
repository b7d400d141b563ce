//! Cloud Foundry's binaries, from the shared fixtures
//! (`../shared/fixtures/cf-policy-server` and `cf-silk`, whose READMEs say
//! how they were built and how to run them).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

/// One fixture's `bin.tar.xz`: where it is, where it is unpacked, and the
/// binaries the tests run from it.
struct Fixture {
    /// Its directory under the fixtures directory.
    name: &'static str,
    /// Its directory under `target/cf-fixtures/`.
    unpacked: &'static str,
    binaries: &'static [&'static str],
}

const POLICY_SERVER: Fixture = Fixture {
    name: "cf-policy-server",
    unpacked: "policy-server",
    binaries: &["policy-server", "policy-server-internal", "migrate-db"],
};

const SILK: Fixture = Fixture {
    name: "cf-silk",
    unpacked: "silk",
    binaries: &[
        "silk-controller",
        "silk-daemon",
        "vxlan-policy-agent",
        "cni-wrapper-plugin",
        "silk-cni-stderr",
        "host-local",
    ],
};

/// The policy server's binaries, unpacked once into
/// `target/cf-fixtures/policy-server/`.
pub(super) fn binaries() -> PathBuf {
    unpack(&POLICY_SERVER)
}

/// Silk's and vxlan-policy-agent's binaries (silk-controller,
/// silk-daemon, vxlan-policy-agent, cni-wrapper-plugin, silk-cni-stderr,
/// host-local), unpacked once into `target/cf-fixtures/silk/`: also the
/// `CNI_PATH` cni-wrapper-plugin finds its delegates in.
pub(crate) fn silk_binaries() -> PathBuf {
    unpack(&SILK)
}

/// `fixture`'s binaries, unpacked once under `target/cf-fixtures/` (the
/// fixture itself is read-only). Unpacked beside their place and renamed
/// into it, so that two test processes never see half an unpacking.
fn unpack(fixture: &Fixture) -> PathBuf {
    let dir = target_dir().join("cf-fixtures").join(fixture.unpacked);
    let complete = |dir: &Path| fixture.binaries.iter().all(|b| dir.join(b).is_file());
    if complete(&dir) {
        return dir;
    }
    let archive = fixtures_dir().join(fixture.name).join("bin.tar.xz");
    assert!(
        archive.is_file(),
        "Cloud Foundry's {} fixture is missing: no {} (set POLICY_TEST_CF_FIXTURES to the \
         fixtures/ directory holding {}/)",
        fixture.name,
        archive.display(),
        fixture.name,
    );
    let parent = dir.parent().expect("cf-fixtures dir");
    fs::create_dir_all(parent).expect("target/cf-fixtures");
    let staging = parent.join(crate::unique_name("unpacking"));
    fs::create_dir_all(&staging).expect("unpacking dir");
    let status = Command::new("tar")
        .arg("xJf")
        .arg(&archive)
        .arg("-C")
        .arg(&staging)
        .status()
        .expect("run tar");
    assert!(status.success(), "tar xJf {}: {status}", archive.display());
    assert!(complete(&staging), "{} lacks one of {:?}", archive.display(), fixture.binaries);
    let _ = fs::remove_dir_all(&dir);
    if fs::rename(&staging, &dir).is_err() {
        // Another process renamed its unpacking into place first.
        let _ = fs::remove_dir_all(&staging);
    }
    assert!(complete(&dir), "could not unpack into {}", dir.display());
    dir
}

/// `POLICY_TEST_CF_FIXTURES`, or the shared fixtures beside the workspace.
fn fixtures_dir() -> PathBuf {
    match std::env::var_os("POLICY_TEST_CF_FIXTURES") {
        Some(fixtures) => PathBuf::from(fixtures),
        None => workspace_root().join("../shared/fixtures"),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}
