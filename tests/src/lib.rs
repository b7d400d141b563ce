//! Fixtures for the privileged tests, the demo and the benchmark: network
//! namespaces laid out like Cloud Foundry's silk, a temporary pin directory,
//! and traffic helpers. Everything created here has a unique name and is
//! removed on drop, also when a test panics.

pub mod agent;
pub mod cf;
pub mod cgroup;
pub mod cluster;
pub mod cni;
pub mod daemon;
pub mod iptables;
pub mod model;
pub mod netns;
pub mod nftables;
pub mod pins;
pub mod raw;
pub mod scratch_root;
pub mod silk;
pub mod test_run;
pub mod tmpfs;
pub mod topology;
pub mod traffic;

use std::sync::atomic::{AtomicU32, Ordering};

/// A name unique to this process and call: `pdp<pid>x<n><suffix>`.
pub fn unique_name(suffix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("pdp{}x{n}{suffix}", std::process::id())
}

/// Panics unless running as root: every test here needs CAP_BPF,
/// CAP_NET_ADMIN and CAP_SYS_ADMIN. Says so instead of failing obscurely.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests need root: run them through `cargo xtask test` as root"
    );
}

/// Polls `check` until it holds or `within` passes; returns whether it held.
pub fn eventually(within: std::time::Duration, mut check: impl FnMut() -> bool) -> bool {
    let started = std::time::Instant::now();
    loop {
        if check() {
            return true;
        }
        if started.elapsed() > within {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Keeps the calling thread on CPU 0: its packets (and its test runs) meet
/// CPU 0's per-CPU state, such as the flow cache.
pub fn pin_this_thread_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is an empty set; 0 = the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set), 0);
    }
}
