//! The policy server's binaries, from the shared fixture
//! (`../shared/fixtures/cf-policy-server`, whose README says how they were
//! built and how to run them).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

/// The fixture's binaries, as `bin.tar.xz` holds them.
const BINARIES: [&str; 3] = ["policy-server", "policy-server-internal", "migrate-db"];

/// The fixture's binaries, unpacked once into
/// `target/cf-fixtures/policy-server/` (the fixture itself is read-only).
/// Unpacked beside it and renamed into place, so that two test processes
/// never see half an unpacking.
pub(super) fn binaries() -> PathBuf {
    let dir = target_dir().join("cf-fixtures/policy-server");
    let complete = |dir: &Path| BINARIES.iter().all(|b| dir.join(b).is_file());
    if complete(&dir) {
        return dir;
    }
    let archive = fixture_dir().join("bin.tar.xz");
    assert!(
        archive.is_file(),
        "Cloud Foundry's policy server fixture is missing: no {} (set POLICY_TEST_CF_FIXTURES \
         to the fixtures/ directory holding cf-policy-server/)",
        archive.display()
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
    assert!(complete(&staging), "{} lacks one of {BINARIES:?}", archive.display());
    let _ = fs::remove_dir_all(&dir);
    if fs::rename(&staging, &dir).is_err() {
        // Another process renamed its unpacking into place first.
        let _ = fs::remove_dir_all(&staging);
    }
    assert!(complete(&dir), "could not unpack into {}", dir.display());
    dir
}

/// `POLICY_TEST_CF_FIXTURES/cf-policy-server`, or the shared fixture
/// beside the workspace.
fn fixture_dir() -> PathBuf {
    match std::env::var_os("POLICY_TEST_CF_FIXTURES") {
        Some(fixtures) => PathBuf::from(fixtures).join("cf-policy-server"),
        None => workspace_root().join("../shared/fixtures/cf-policy-server"),
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
