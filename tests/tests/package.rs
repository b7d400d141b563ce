//! The Debian package as an operator gets it: `cargo xtask package`, then
//! `dpkg -i` into a scratch root that holds only the package's dependencies
//! (copied from this host), where the installed agent and plugin run
//! chrooted; then `dpkg -r` and `dpkg --purge`. Nothing is installed into
//! this host's root or its dpkg database.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
};

use integration_tests::{pins::PinDir, require_root, scratch_root::ScratchRoot};

const AGENT: &str = "/usr/bin/policy-agent";
const PLUGIN: &str = "/opt/cni/bin/policy-cni";
const UNIT: &str = "/usr/lib/systemd/system/policy-agent.service";
const CONFIG: &str = "/etc/policy-agent/policy-agent.toml";
const CONFLIST: &str = "/etc/cni/net.d/policy-net.conflist";

fn stdout(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `cargo xtask package`, as the README has the operator run it; the path of
/// the package is its last line. The release binaries are already built.
fn build_package() -> String {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["xtask", "package"])
        .current_dir(workspace)
        .stderr(Stdio::inherit())
        .output()
        .expect("run cargo xtask package");
    let printed = stdout(&out, "cargo xtask package");
    let deb = printed.lines().last().expect("cargo xtask package printed no path").to_owned();
    assert!(Path::new(&deb).is_file(), "cargo xtask package printed {deb:?}, not a file");
    deb
}

fn dpkg_deb(args: &[&str]) -> String {
    stdout(&Command::new("dpkg-deb").args(args).output().expect("run dpkg-deb"), "dpkg-deb")
}

fn host_status() -> Output {
    Command::new("dpkg-query").args(["--show", "policy-agent"]).output().expect("run dpkg-query")
}

#[test]
fn package_installs_runs_and_removes() {
    require_root();
    let host_before = host_status();
    let deb = build_package();
    let field = |name| dpkg_deb(&["--field", &deb, name]).trim().to_owned();
    let version = field("Version");
    let arch = stdout(
        &Command::new("dpkg").arg("--print-architecture").output().expect("run dpkg"),
        "dpkg --print-architecture",
    );
    assert!(
        deb.ends_with(&format!("/target/debian/policy-agent_{version}_{}.deb", arch.trim())),
        "{deb}"
    );
    assert!(field("Depends").contains("libc6"), "Depends: {}", field("Depends"));

    let contents = dpkg_deb(&["--contents", &deb]);
    for path in [AGENT, PLUGIN, UNIT, CONFIG, CONFLIST] {
        assert!(
            contents.lines().any(|line| line.ends_with(&format!(" .{path}"))),
            "{path} is not in the package:\n{contents}"
        );
    }
    let conffiles = dpkg_deb(&["--info", &deb, "conffiles"]);
    assert_eq!(conffiles.lines().collect::<Vec<_>>(), [CONFIG, CONFLIST]);

    // Installed: dpkg takes it without forcing, into a root where its
    // dependencies are all there is.
    let root = ScratchRoot::with_depends(&field("Depends"));
    stdout(&root.dpkg(&["--install", &deb]), "dpkg --install");
    assert_eq!(root.status("policy-agent").as_deref(), Some("install ok installed"));
    stdout(&root.dpkg(&["--verify", "policy-agent"]), "dpkg --verify");

    // The installed binaries run there: the agent reports the package's
    // version (Cargo's, where Debian writes a pre-release's `-` as `~`).
    let printed = stdout(&root.chroot(AGENT).arg("--version").output().expect("chroot"), AGENT);
    assert_eq!(printed.trim(), format!("policy-agent {}", version.replace('~', "-")));
    let printed = stdout(
        &root
            .chroot(PLUGIN)
            .env("CNI_COMMAND", "VERSION")
            .stdin(Stdio::null())
            .output()
            .expect("chroot"),
        PLUGIN,
    );
    let answer: serde_json::Value = serde_json::from_str(&printed).expect("VERSION answers JSON");
    assert!(answer["supportedVersions"].as_array().is_some_and(|v| !v.is_empty()), "{answer}");

    // The unit starts the installed agent with the installed configuration,
    // and the network list names the installed plugin.
    let unit = std::fs::read_to_string(root.path(UNIT)).expect("read the unit");
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart");
    let exec: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(exec, [AGENT, "run", "--config", CONFIG]);
    let conflist: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.path(CONFLIST)).expect("read the conflist"))
            .expect("the conflist is JSON");
    assert_eq!(conflist["plugins"][0]["type"], "policy-cni", "{PLUGIN} is policy-cni");

    // The programs embedded in the (stripped) installed agent pass the
    // verifier: it loads them as `dataplane load` (on the host's bpffs).
    let pins = PinDir::new();
    let loaded = Command::new(root.path(AGENT))
        .args(["dataplane", "--pin-dir"])
        .arg(pins.path())
        .arg("load")
        .output()
        .expect("run the installed agent");
    stdout(&loaded, "the installed agent's dataplane load");
    drop(pins);

    // Removed: the binaries go, the configuration stays as the operator
    // edited it; purged: the configuration goes too.
    let edited = format!("{}# edited\n", std::fs::read_to_string(root.path(CONFIG)).unwrap());
    std::fs::write(root.path(CONFIG), &edited).expect("edit the configuration");
    stdout(&root.dpkg(&["--remove", "policy-agent"]), "dpkg --remove");
    assert_eq!(root.status("policy-agent").as_deref(), Some("deinstall ok config-files"));
    for path in [AGENT, PLUGIN, UNIT] {
        assert!(!root.path(path).exists(), "{path} is still there after dpkg --remove");
    }
    assert_eq!(std::fs::read_to_string(root.path(CONFIG)).ok(), Some(edited));
    assert!(root.path(CONFLIST).exists(), "dpkg --remove took the conflist away");
    stdout(&root.dpkg(&["--purge", "policy-agent"]), "dpkg --purge");
    for path in [CONFIG, CONFLIST] {
        assert!(!root.path(path).exists(), "{path} is still there after dpkg --purge");
    }
    assert_ne!(root.status("policy-agent").as_deref(), Some("deinstall ok config-files"));

    let host_after = host_status();
    assert_eq!(
        (host_before.status.code(), host_before.stdout),
        (host_after.status.code(), host_after.stdout),
        "the host's dpkg database changed"
    );
}
