//! What an agent costs while nothing changes: its CPU time over a window
//! without writes, per poll of the policy server.

use std::time::Duration;

/// CPU time a process has used: its threads', and that of the children it
/// has waited for (the iptables commands an agent runs).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTime {
    pub threads: Duration,
    pub children: Duration,
}

impl CpuTime {
    /// `pid`'s now. Its threads' from the kernel's CPU clock of the
    /// process (`clock_getcpuclockid(3)`: utime + stime of every thread,
    /// exited ones included, in ns), where `/proc/PID/stat` counts the
    /// same in clock ticks (10 ms: a 1 s poll's share would be lost in
    /// the rounding); its waited-for children's from that file's cutime +
    /// cstime. Panics if the process is gone.
    pub fn of(pid: u32) -> Self {
        let mut clock: libc::clockid_t = 0;
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: both calls write only through the pointers given, which
        // point at live locals.
        let ok = unsafe {
            libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) == 0
                && libc::clock_gettime(clock, &mut now) == 0
        };
        assert!(ok, "the CPU clock of process {pid}: {}", std::io::Error::last_os_error());
        let threads = Duration::new(now.tv_sec as u64, now.tv_nsec as u32);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
        // After the command name (in parentheses, maybe with spaces) come
        // the fields from the 3rd on; cutime and cstime are the 16th and
        // 17th (proc_pid_stat(5)).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks: u64 =
            fields.get(13..15).into_iter().flatten().filter_map(|f| f.parse::<u64>().ok()).sum();
        // SAFETY: sysconf has no preconditions.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Self { threads, children: Duration::from_secs_f64(ticks as f64 / per_second) }
    }

    /// What was used between `earlier` and this.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            threads: self.threads.saturating_sub(earlier.threads),
            children: self.children.saturating_sub(earlier.children),
        }
    }

    pub fn total(self) -> Duration {
        self.threads + self.children
    }
}

/// Each of `pids`' CPU time over the same `window`, slept through.
pub fn over_window(pids: &[u32], window: Duration) -> Vec<CpuTime> {
    let before: Vec<CpuTime> = pids.iter().map(|&pid| CpuTime::of(pid)).collect();
    std::thread::sleep(window);
    pids.iter().zip(before).map(|(&pid, before)| CpuTime::of(pid).since(before)).collect()
}
