//! `cargo xtask package`: the Debian package an operator installs with
//! `dpkg -i`, built with `dpkg-deb` from a tree staged under
//! `target/debian/` (no packaging tool beyond dpkg-dev and binutils, which
//! setup installs).
//!
//! Where things go: the agent in `/usr/bin`; the plugin in `/opt/cni/bin`,
//! where CNI runtimes (garden, containerd, podman) look by default; the
//! unit in `/usr/lib/systemd/system` (systemd reads it there as it does
//! `/lib/...`, and on a merged-/usr system `/lib` is an alias dpkg should
//! not ship files under); the configuration and the network list in `/etc`
//! as conffiles, so an upgrade keeps an operator's edits and a purge removes
//! them. The maintainer scripts (`deploy/debian/`) reload systemd and
//! restart a running agent on upgrade; nothing enables or starts the agent
//! on install (see `deploy/debian/postinst`).

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::{run, setup};

const PACKAGE: &str = "policy-agent";
const MAINTAINER: &str =
    "policy-dataplane maintainers <maintainers@users.noreply.h-seed-fd271298.example>";

/// One installed file: where it comes from (relative to the workspace root,
/// or to the target directory for built binaries), where it goes, its mode.
struct Install {
    from: Source,
    to: &'static str,
    mode: u32,
}

enum Source {
    /// A release binary, stripped as Debian's dh_strip does.
    Binary(&'static str),
    Workspace(&'static str),
}

const FILES: &[Install] = &[
    Install { from: Source::Binary("policy-agent"), to: "usr/bin/policy-agent", mode: 0o755 },
    Install { from: Source::Binary("policy-cni"), to: "opt/cni/bin/policy-cni", mode: 0o755 },
    Install {
        from: Source::Workspace("deploy/policy-agent.service"),
        to: "usr/lib/systemd/system/policy-agent.service",
        mode: 0o644,
    },
    Install {
        from: Source::Workspace("deploy/policy-agent.toml"),
        to: "etc/policy-agent/policy-agent.toml",
        mode: 0o644,
    },
    Install {
        from: Source::Workspace("deploy/cni/policy-net.conflist"),
        to: "etc/cni/net.d/policy-net.conflist",
        mode: 0o644,
    },
    Install {
        from: Source::Workspace("deploy/debian/copyright"),
        to: "usr/share/doc/policy-agent/copyright",
        mode: 0o644,
    },
    // Cloud Foundry's part of garden's configuration: the operator merges it
    // into garden's own, so it is an example, not a file garden reads.
    Install {
        from: Source::Workspace("deploy/cni/cf-garden.json"),
        to: "usr/share/doc/policy-agent/examples/cf-garden.json",
        mode: 0o644,
    },
];

/// Files under /etc that dpkg keeps across upgrades and removes on purge.
const CONFFILES: &[&str] =
    &["etc/policy-agent/policy-agent.toml", "etc/cni/net.d/policy-net.conflist"];

const MAINTAINER_SCRIPTS: &[&str] = &["postinst", "prerm", "postrm"];

const DESCRIPTION: &str = "eBPF network policy dataplane for containers
 Cloud Foundry's container-to-container networking model enforced by
 kernel programs on each container's host-side veth: apps identified by
 tags, traffic between containers denied unless a policy allows it.
 .
 This package holds the policy-agent daemon and CLI with its systemd unit
 and default configuration, and the policy-cni CNI plugin with a network
 list for CNI runtimes.";

/// Builds the release binaries, stages the package's tree and builds
/// `target/debian/policy-agent_VERSION_ARCH.deb`; returns its path.
pub fn build(root: &Path) -> Result<PathBuf> {
    run::build_agent(root)?;
    let target = target_dir(root);
    let out = target.join("debian");
    // dpkg-shlibdeps finds binaries in debian/PACKAGE/ below its working
    // directory, as debhelper lays them out.
    let work = out.join("build");
    let tree = work.join("debian").join(PACKAGE);
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("cannot remove {}", work.display()))?;
    }
    for file in FILES {
        let from = match file.from {
            Source::Binary(name) => target.join("release").join(name),
            Source::Workspace(path) => root.join(path),
        };
        let to = tree.join(file.to);
        stage(&from, &to, file.mode)?;
        if let Source::Binary(_) = file.from {
            let mut strip = Command::new("strip");
            strip.args(["--remove-section=.comment", "--remove-section=.note"]).arg(&to);
            run::run(strip, "strip")?;
        }
    }
    let debian = tree.join("DEBIAN");
    for script in MAINTAINER_SCRIPTS {
        stage(&root.join("deploy/debian").join(script), &debian.join(script), 0o755)?;
    }
    write(
        &debian.join("conffiles"),
        &CONFFILES.iter().map(|f| format!("/{f}\n")).collect::<String>(),
    )?;
    write(&debian.join("md5sums"), &md5sums(&tree)?)?;

    let version = version(root)?;
    let arch = setup::output(Command::new("dpkg").arg("--print-architecture"))?.trim().to_owned();
    let control = format!(
        "Package: {PACKAGE}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: {MAINTAINER}\n\
         Installed-Size: {}\nDepends: {}\nSection: net\nPriority: optional\n\
         Description: {DESCRIPTION}\n",
        installed_size_kib(&tree)?,
        depends(&work, &tree)?,
    );
    write(&debian.join("control"), &control)?;
    // Modes from the umask would reach the installed directories.
    set_dir_modes(&tree)?;

    let deb = out.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    // xz at level 1: 6 MB in 4 s here, where dpkg-deb's default level 6
    // takes 16 s for 4.9 MB; every dpkg reads xz.
    setup::output(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "-z1", "--build"])
            .arg(&tree)
            .arg(&deb),
    )
    .context("dpkg-deb could not build the package")?;
    Ok(deb)
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |dir| root.join(dir))
}

fn stage(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", to.display()))
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// The agent's Cargo version in Debian's terms: a pre-release (`1.0.0-rc.1`)
/// sorts before its release with `~`, as `-` does in semver.
fn version(root: &Path) -> Result<String> {
    let mut pkgid = run::cargo(root);
    pkgid.args(["pkgid", "-p", PACKAGE]);
    let id = setup::output(&mut pkgid)?;
    // path+file:///.../policy-agent#0.1.0, or ...#name@0.1.0
    let version = id
        .trim()
        .rsplit_once('#')
        .map(|(_, v)| v.rsplit_once('@').map_or(v, |(_, v)| v))
        .with_context(|| format!("cannot read a version in `cargo pkgid` output {id:?}"))?;
    Ok(version.replace('-', "~"))
}

/// The shared libraries the binaries link, as versioned package
/// dependencies (`libc6 (>= 2.34), libgcc-s1 (>= 4.2)` on Debian 12).
fn depends(work: &Path, tree: &Path) -> Result<String> {
    // dpkg-shlibdeps wants a source package's control file; it reads
    // nothing from it here.
    write(&work.join("debian/control"), "Source: policy-agent\n")?;
    let mut shlibdeps = Command::new("dpkg-shlibdeps");
    shlibdeps.current_dir(work).arg("-O");
    for file in FILES {
        if let Source::Binary(_) = file.from {
            shlibdeps.arg(tree.join(file.to));
        }
    }
    let substvars = setup::output(&mut shlibdeps)?;
    substvars
        .lines()
        .find_map(|line| line.strip_prefix("shlibs:Depends="))
        .map(str::to_owned)
        .with_context(|| format!("dpkg-shlibdeps named no dependencies: {substvars:?}"))
}

/// Every regular file of the tree outside DEBIAN/, relative to it.
fn payload(tree: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut dirs = vec![tree.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                if path != tree.join("DEBIAN") {
                    dirs.push(path);
                }
            } else {
                files.push(path.strip_prefix(tree)?.to_path_buf());
            }
        }
    }
    files.sort();
    Ok(files)
}

/// What `dpkg --verify` checks the installed files against.
fn md5sums(tree: &Path) -> Result<String> {
    let mut md5sum = Command::new("md5sum");
    md5sum.current_dir(tree).args(payload(tree)?);
    setup::output(&mut md5sum)
}

/// Debian policy's estimate: each file's size rounded up to KiB.
fn installed_size_kib(tree: &Path) -> Result<u64> {
    payload(tree)?.iter().try_fold(0, |sum, file| {
        let len = fs::metadata(tree.join(file))?.len();
        Ok(sum + len.div_ceil(1024))
    })
}

fn set_dir_modes(dir: &Path) -> Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
    for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            set_dir_modes(&path)?;
        }
    }
    Ok(())
}
