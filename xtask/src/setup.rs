//! Installs what the project needs, and only what is missing:
//! - the `rust-src` component of the installed nightly (for `-Z build-std`);
//! - bpf-linker 0.13, built against that nightly's LLVM 22, under the
//!   project's tools directory (`$POLICY_TOOLS_DIR`, default
//!   `~/.cache/policy-dataplane`), where policy-agent's build.rs finds it;
//! - the Debian packages the tests, the demo and the package build use.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

pub const BPF_LINKER_VERSION: &str = "0.13.0";
const NIGHTLY: &str = "nightly";
/// The LLVM major version of the installed nightly; bpf-linker's feature.
const LLVM_FEATURE: &str = "llvm-22";

/// Debian packages the tests, the demo and the benchmarks use (dig, curl
/// and openssl are the real clients of the DNS and TLS tests), with the
/// command each provides, or a file's absolute path (checked instead of
/// asking dpkg when present). iptables is the benchmarks' Cloud Foundry
/// baseline, nftables (with sets) the strongest non-eBPF one, haproxy the
/// TLS terminator peer; the font labels the benchmarks' plots; etcd is the cluster
/// tests' shared store (each test starts its own process); protoc builds the
/// agent's etcd client.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("bpftool", "bpftool"),
    ("netcat-openbsd", "nc"),
    ("iputils-ping", "ping"),
    ("iperf3", "iperf3"),
    ("dnsutils", "dig"),
    ("curl", "curl"),
    ("openssl", "openssl"),
    ("iptables", "iptables-legacy-restore"),
    ("nftables", "nft"),
    ("etcd-server", "etcd"),
    ("etcd-client", "etcdctl"),
    // The CNI plugin's tests: a real runtime (podman's CNI backend, runc),
    // the reference plugins, a static busybox as the containers' root.
    ("podman", "podman"),
    ("runc", "runc"),
    ("containernetworking-plugins", "/usr/lib/cni/ptp"),
    // By package: the dynamic `busybox` installs the same /bin/busybox, and
    // a container's root has no libc for it.
    ("busybox-static", "dpkg:busybox-static"),
    ("fonts-dejavu-core", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
    // The TLS benchmark's peer: a per-container terminator on 61443's model.
    ("haproxy", "/usr/sbin/haproxy"),
    // Cloud Foundry's policy server's database in the CF tests
    // (`tests/src/cf.rs` runs its own server as the `postgres` user the
    // package creates). By its version: bookworm's `postgresql` is 15, the
    // version the fixture names and the tests' path; on another release
    // this fails loudly instead of installing a server the tests miss.
    ("postgresql-15", "/usr/lib/postgresql/15/bin/postgres"),
    // The agent's etcd client (etcd-client, gRPC over tonic) generates its
    // protocol code at build time: protoc and the well-known .proto files.
    ("protobuf-compiler", "protoc"),
    ("libprotobuf-dev", "/usr/include/google/protobuf/descriptor.proto"),
    // `cargo xtask package`: dpkg-shlibdeps computes the package's
    // dependencies, strip makes the binaries Debian-sized.
    ("dpkg-dev", "dpkg-shlibdeps"),
    ("binutils", "strip"),
];

pub fn tools_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("POLICY_TOOLS_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let home = env::var_os("HOME").context("HOME is not set; set POLICY_TOOLS_DIR instead")?;
    Ok(PathBuf::from(home).join(".cache/policy-dataplane"))
}

pub fn run() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    debian_packages()?;
    Ok(())
}

pub fn output(cmd: &mut Command) -> Result<String> {
    let out =
        cmd.stderr(Stdio::inherit()).output().with_context(|| format!("failed to run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("failed to run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", NIGHTLY]))
        .context("the nightly toolchain is missing: the eBPF crate builds with `rustup run nightly`; install a nightly with LLVM 22 (`rustup toolchain install nightly`)")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("setup: installing rust-src for the {NIGHTLY} toolchain");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
        .context("could not install the nightly rust-src component")
}

fn linker_works(bin: &Path) -> bool {
    Command::new(bin).arg("--version").stderr(Stdio::null()).output().is_ok_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
    })
}

/// bpf-linker links against the nightly's own libLLVM: the install prefix
/// gets links to it (the binary's RUNPATH points there), so the prefix must
/// not move, and a nightly update that changes the library shows up as a
/// linker that no longer runs, which triggers a rebuild here.
fn bpf_linker() -> Result<()> {
    let prefix = tools_dir()?.join("bpf-linker");
    let bin = prefix.join("bin/bpf-linker");
    if linker_works(&bin) {
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM into {}",
        prefix.display()
    );
    let sysroot =
        output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    let llvm_dir = PathBuf::from(sysroot.trim()).join("lib");
    let libllvm = fs::read_dir(&llvm_dir)
        .with_context(|| format!("cannot read {}", llvm_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so.22"))
        })
        .with_context(|| {
            format!("no libLLVM.so.22* in {}: the nightly must ship LLVM 22", llvm_dir.display())
        })?;
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    for name in [libllvm.file_name().map(PathBuf::from), Some(PathBuf::from("libLLVM.so"))]
        .into_iter()
        .flatten()
    {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("cannot link {} to {}", link.display(), libllvm.display()))?;
    }
    status(
        Command::new("cargo")
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                LLVM_FEATURE,
                "--root",
            ])
            .arg(&prefix)
            .env("LLVM_PREFIX", &prefix)
            // Build it with the stable cargo, whatever the caller's override.
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
    .context("could not build bpf-linker (needs crates.io and a C toolchain)")?;
    if !linker_works(&bin) {
        bail!("bpf-linker was built but {} --version does not run", bin.display());
    }
    Ok(())
}

fn on_path(command: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|path| env::split_paths(&path).any(|dir| dir.join(command).is_file()))
        || ["/usr/sbin", "/sbin"].iter().any(|dir| Path::new(dir).join(command).is_file())
}

/// Whether what a package provides is here: a path, a `dpkg:PACKAGE`
/// installed, or a command on PATH.
fn present(provides: &str) -> bool {
    if let Some(package) = provides.strip_prefix("dpkg:") {
        return Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", package])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"));
    }
    if provides.starts_with('/') { Path::new(provides).exists() } else { on_path(provides) }
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(_, provides)| !present(provides))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages {}", missing.join(" "));
    let hint = || {
        format!(
            "could not install Debian packages ({}); install them by hand: apt-get install {}",
            missing.join(", "),
            missing.join(" ")
        )
    };
    status(Command::new("apt-get").args(["update", "-qq"])).with_context(hint)?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(hint)
}
