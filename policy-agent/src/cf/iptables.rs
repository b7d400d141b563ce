//! Living beside CF's cni-wrapper-plugin, which stays the cell's CNI
//! plugin when vxlan-policy-agent is replaced: for each container it puts
//! an `overlay--HANDLE` chain in the filter table's FORWARD that REJECTs
//! every new connection into the container unless something earlier
//! accepted it — on a vxlan-policy-agent cell, that agent's `vpa--` chain
//! at FORWARD's top, with a rule per allowed (source tag, destination,
//! port). Here the decision is the eBPF program's, on the container's
//! veth, after FORWARD; so the agent keeps a chain of its own at
//! FORWARD's top that lets packets from one of its endpoints' veths into
//! another's through (`policy-agent`: `-i VETH -j policy-agent--to`;
//! `policy-agent--to`: `-o VETH -j ACCEPT`), as `vpa--` does for what it
//! allows, and the program then allows or denies them by policy.
//!
//! Only between its endpoints: a packet into a container from anywhere
//! else (another cell through `silk-vtep`, the underlay, a container the
//! agent does not police) still meets cni-wrapper-plugin's REJECT, as on
//! a vxlan-policy-agent cell for a packet no rule allows. Packets from
//! other cells are not let through yet: the programs do not yet take the
//! tag of silk's VXLAN header (see the README, *Not done yet*).
//!
//! A container's own egress is left to cni-wrapper-plugin's chains
//! (`netout--HANDLE`: its security groups, deny networks), except with
//! dynamic security groups on, where the agent's NetOut rules hold
//! (`-i VETH -j ACCEPT`, only for apps whose rules are in force — never
//! an app whose egress the agent does not check).
//!
//! Changes are made with `iptables-restore --noflush` (the chain is
//! rewritten whole, other chains untouched) under the same `flock` on
//! `iptables_lock_file` that cni-wrapper-plugin and vxlan-policy-agent
//! take, and only when the rules change.

use std::{
    collections::BTreeSet,
    fs::File,
    io::Write as _,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use tracing::info;

use crate::agent::SharedAgent;

/// The agent's chain in the filter table, jumped to from FORWARD's top.
pub const CHAIN: &str = "policy-agent";
/// Its second chain: packets from an endpoint's veth, by where they go.
pub const TO_CHAIN: &str = "policy-agent--to";

pub struct AcceptChain {
    lock_file: Option<PathBuf>,
    /// Whether the agent sets NetOut from dynamic security groups.
    egress: bool,
    /// The rules as last written (None: not yet).
    written: Option<Vec<String>>,
    /// silk's VXLAN device, once the agent joined the overlay: packets
    /// from other cells are let through to the programs too.
    tunnel: Option<String>,
}

impl AcceptChain {
    pub fn new(lock_file: Option<PathBuf>, egress: bool) -> Self {
        Self { lock_file, egress, written: None, tunnel: None }
    }

    /// Lets packets from silk's VXLAN device through (Some), or not.
    pub fn set_tunnel(&mut self, vtep: Option<&str>) {
        self.tunnel = vtep.map(str::to_owned);
    }

    /// The chain's rules for the agent's local endpoints.
    fn wanted(&self, agent: &SharedAgent) -> Vec<String> {
        let agent = crate::agent::lock(agent);
        let state = agent.state();
        let mut rules = BTreeSet::new();
        let mut egress = BTreeSet::new();
        if let Some(vtep) = &self.tunnel {
            rules.insert(format!("-A {CHAIN} -i {vtep} -j {TO_CHAIN}"));
        }
        for e in state.local_endpoints() {
            rules.insert(format!("-A {CHAIN} -i {} -j {TO_CHAIN}", e.ifname));
            rules.insert(format!(
                "-A {TO_CHAIN} -o {} -m comment --comment \"policy-agent: its eBPF program decides\" -j ACCEPT",
                e.ifname
            ));
            if self.egress && state.netout().contains_key(e.app.as_str()) {
                egress.insert(format!(
                    "-A {CHAIN} -i {} -m comment --comment \"policy-agent: its NetOut rules decide\" -j ACCEPT",
                    e.ifname
                ));
            }
        }
        // The egress rules after the jumps: between endpoints first.
        rules.into_iter().chain(egress).collect()
    }

    /// Writes the chain if the endpoints' rules changed.
    pub fn sync(&mut self, agent: &SharedAgent) -> Result<(), String> {
        let wanted = self.wanted(agent);
        if self.written.as_ref() == Some(&wanted) {
            return Ok(());
        }
        let _lock = self.lock()?;
        let mut input = format!("*filter\n:{CHAIN} - [0:0]\n:{TO_CHAIN} - [0:0]\n");
        for rule in &wanted {
            input.push_str(rule);
            input.push('\n');
        }
        input.push_str("COMMIT\n");
        run("iptables-restore", &["-w", "--noflush"], Some(&input))?;
        // At FORWARD's top, ahead of cni-wrapper-plugin's chains.
        if run("iptables", &["-w", "-C", "FORWARD", "-j", CHAIN], None).is_err() {
            run("iptables", &["-w", "-I", "FORWARD", "1", "-j", CHAIN], None)?;
        }
        info!(
            rules = wanted.len(),
            chain = CHAIN,
            "iptables: endpoints' veths let through to their eBPF programs"
        );
        self.written = Some(wanted);
        Ok(())
    }

    /// cni-wrapper-plugin's and vxlan-policy-agent's lock around iptables.
    fn lock(&self) -> Result<Option<File>, String> {
        let Some(path) = &self.lock_file else { return Ok(None) };
        // As cni-wrapper-plugin's lock does: its directory made if missing.
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| {
            format!("cannot open the iptables lock file {}: {e}", path.display())
        })?;
        // SAFETY: flock on a descriptor owned by `file`, held until it drops.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!(
                "cannot lock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(Some(file))
    }
}

/// Removes the agent's chains and FORWARD's jump to them, if there
/// (`policy-agent teardown`): cni-wrapper-plugin's default REJECT then
/// holds again for every container. Returns whether there was anything.
pub fn remove(lock_file: Option<PathBuf>) -> Result<bool, String> {
    let chain = AcceptChain::new(lock_file, false);
    let _lock = chain.lock()?;
    if run("iptables", &["-w", "-n", "-L", CHAIN], None).is_err() {
        return Ok(false);
    }
    while run("iptables", &["-w", "-D", "FORWARD", "-j", CHAIN], None).is_ok() {}
    for c in [CHAIN, TO_CHAIN] {
        // Flushed first: a chain is deleted only empty and unreferenced.
        let _ = run("iptables", &["-w", "-F", c], None);
    }
    for c in [CHAIN, TO_CHAIN] {
        run("iptables", &["-w", "-X", c], None)?;
    }
    Ok(true)
}

fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<(), String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e} - is iptables installed?"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(|e| format!("{program}: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
