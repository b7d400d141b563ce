//! cgroup v2 helpers.

use std::path::PathBuf;

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one (as on this project's machines).
pub fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("read mounts");
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, mount_point, fs_type) = (fields.next()?, fields.next()?, fields.next()?);
            (fs_type == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .next()
        .expect("cgroup v2 is not mounted")
}

/// The cgroup v2 directory of this process.
pub fn own_cgroup() -> PathBuf {
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("no cgroup v2 entry in /proc/self/cgroup");
    cgroup2_root().join(path.trim_start_matches('/'))
}

pub fn own_cgroup_id() -> u64 {
    policy_agent::dataplane::cgroup_id(&own_cgroup()).expect("own cgroup id")
}

/// A new cgroup v2 directory, removed on drop (after its processes exit).
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new() -> Self {
        let path = cgroup2_root().join(crate::unique_name("cg"));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    pub fn id(&self) -> u64 {
        policy_agent::dataplane::cgroup_id(&self.path).expect("cgroup id")
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // rmdir fails while processes are still inside: retry briefly.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("warning: could not remove cgroup {}", self.path.display());
    }
}
