//! Named network namespaces (`ip netns`), removed on drop.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Command, Output},
};

/// A network namespace at /run/netns/NAME.
pub struct NetNs {
    name: String,
}

fn check(output: std::io::Result<Output>, what: &str) -> Output {
    let output = output.unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        output.status.success(),
        "{what}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs `ip ARGS...`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    check(Command::new("ip").args(args).output(), &format!("ip {}", args.join(" ")));
}

impl NetNs {
    pub fn new(name: String) -> Self {
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// The TC filters on `ifname`'s `hook` (`ingress` or `egress`) in this
    /// namespace, as `tc -j filter show` lists them: (priority, name the
    /// BPF program was attached under, program id) for each `bpf` filter.
    pub fn tc_bpf_filters(&self, ifname: &str, hook: &str) -> Vec<(u64, String, u32)> {
        let out = check(
            self.command("tc").args(["-j", "filter", "show", "dev", ifname, hook]).output(),
            &format!("tc filter show dev {ifname} {hook}"),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        if text.trim().is_empty() {
            return Vec::new();
        }
        let filters: Vec<serde_json::Value> =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("tc -j: {e}: {text}"));
        filters
            .iter()
            .filter(|f| f["kind"] == "bpf")
            .filter_map(|f| {
                let options = f.get("options")?;
                Some((
                    f["pref"].as_u64().unwrap_or(0),
                    options["bpf_name"].as_str().unwrap_or_default().to_owned(),
                    u32::try_from(options["prog"]["id"].as_u64()?).ok()?,
                ))
            })
            .collect()
    }

    /// A command that runs inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Makes `ip netns exec` commands in this namespace resolve names with
    /// `nameserver` (iproute2 bind-mounts /etc/netns/NAME/resolv.conf).
    pub fn use_nameserver(&self, nameserver: std::net::Ipv4Addr) {
        let dir = PathBuf::from("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).expect("create /etc/netns dir");
        std::fs::write(dir.join("resolv.conf"), format!("nameserver {nameserver}\n"))
            .expect("write resolv.conf");
    }

    /// Writes a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value))
            .unwrap_or_else(|e| panic!("sysctl {key}={value} in {}: {e}", self.name));
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets made in
    /// `f` stay in the namespace wherever they are used afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        run_in(&self.path(), f)
    }

    /// Moves the calling thread into this namespace until the guard drops.
    pub fn enter(&self) -> EnteredNetNs {
        let original = File::open("/proc/thread-self/ns/net").expect("open own netns");
        enter(&self.path());
        EnteredNetNs { original }
    }
}

/// Runs `f` on a thread that has entered the namespace at `path`.
pub fn run_in<T: Send>(path: &std::path::Path, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                enter(path);
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

fn enter(path: &std::path::Path) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: setns on a valid namespace fd affects only this thread.
    let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(ret, 0, "setns {}: {}", path.display(), std::io::Error::last_os_error());
}

/// Returns the thread to its original namespace on drop.
pub struct EnteredNetNs {
    original: File,
}

impl Drop for EnteredNetNs {
    fn drop(&mut self) {
        // SAFETY: as in `enter`.
        let ret = unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        if ret != 0 && !std::thread::panicking() {
            panic!("cannot return to the original netns: {}", std::io::Error::last_os_error());
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&self.name));
        let out = Command::new("ip").args(["netns", "del", &self.name]).output();
        if !matches!(&out, Ok(o) if o.status.success()) && !std::thread::panicking() {
            eprintln!("warning: could not delete netns {}: {out:?}", self.name);
        }
    }
}
