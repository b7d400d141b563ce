//! Address leases on disk, like the reference `host-local` plugin: one
//! file per leased address (named by it, holding the container id and
//! interface), a `last_reserved` pointer so a released address is not
//! handed out again at once, and an exclusive lock around every change, so
//! parallel ADDs never get the same address.

use std::{
    collections::BTreeSet,
    fs::{self, File, OpenOptions},
    io::Write as _,
    net::Ipv4Addr,
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use crate::error::{CniError, Result, code};

pub struct Leases {
    dir: PathBuf,
    _lock: File,
}

/// One lease: the address and who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub container_id: String,
    pub ifname: String,
}

impl Leases {
    /// The leases in `dir` (created 0700), locked until dropped.
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir)
            .map_err(|e| CniError::io(format!("cannot create {}", dir.display()), e))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| CniError::io(format!("cannot open {}", lock_path.display()), e))?;
        // SAFETY: flock on a descriptor we own; blocks until other plugin
        // runs are done with the leases.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(CniError::io(
                format!("cannot lock {}", lock_path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Self { dir: dir.to_path_buf(), _lock: lock })
    }

    /// Every lease.
    pub fn all(&self) -> Vec<Lease> {
        let Ok(entries) = fs::read_dir(&self.dir) else { return Vec::new() };
        entries
            .filter_map(|e| {
                let e = e.ok()?;
                let ip: Ipv4Addr = e.file_name().to_str()?.parse().ok()?;
                let text = fs::read_to_string(e.path()).ok()?;
                let mut lines = text.lines();
                Some(Lease {
                    ip,
                    container_id: lines.next()?.to_owned(),
                    ifname: lines.next().unwrap_or_default().to_owned(),
                })
            })
            .collect()
    }

    /// The address leased to this attachment, if any.
    pub fn find(&self, container_id: &str, ifname: &str) -> Option<Ipv4Addr> {
        self.all()
            .into_iter()
            .find(|l| l.container_id == container_id && l.ifname == ifname)
            .map(|l| l.ip)
    }

    /// Leases an address of `subnet` to the attachment (its existing lease
    /// if it has one), skipping `taken` (addresses the agent already knows)
    /// and the subnet's first and last.
    pub fn reserve(
        &mut self,
        container_id: &str,
        ifname: &str,
        (network, prefix): (Ipv4Addr, u8),
        taken: &BTreeSet<Ipv4Addr>,
    ) -> Result<Ipv4Addr> {
        if let Some(ip) = self.find(container_id, ifname) {
            return Ok(ip);
        }
        let first = u32::from(network) + 1;
        let last = u32::from(network) + (1u32 << (32 - prefix)) - 2;
        let size = last - first + 1;
        let start = fs::read_to_string(self.dir.join("last_reserved"))
            .ok()
            .and_then(|t| t.trim().parse::<Ipv4Addr>().ok())
            .map(u32::from)
            .filter(|ip| (first..=last).contains(ip))
            .map_or(first, |ip| if ip == last { first } else { ip + 1 });
        for i in 0..size {
            let ip = Ipv4Addr::from(first + (start - first + i) % size);
            if taken.contains(&ip) {
                continue;
            }
            let path = self.dir.join(ip.to_string());
            match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
                Ok(mut f) => {
                    f.write_all(format!("{container_id}\n{ifname}\n").as_bytes())
                        .and_then(|()| f.sync_all())
                        .map_err(|e| CniError::io(format!("cannot write {}", path.display()), e))?;
                    let _ = policy_api::files::replace(
                        &self.dir.join("last_reserved"),
                        ip.to_string().as_bytes(),
                        0o600,
                    );
                    return Ok(ip);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(CniError::io(format!("cannot create {}", path.display()), e)),
            }
        }
        Err(CniError::new(
            code::NO_ADDRESS,
            format!(
                "no address left in {network}/{prefix} ({size} addresses, all leased or registered)"
            ),
        ))
    }

    /// Releases this attachment's lease; returns its address.
    pub fn release(&mut self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>> {
        let Some(ip) = self.find(container_id, ifname) else { return Ok(None) };
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Ok(()) => Ok(Some(ip)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some(ip)),
            Err(e) => Err(CniError::io(format!("cannot remove {}", path.display()), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("policy-cni-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn leases_are_unique_idempotent_and_not_reused_at_once() {
        let d = dir("leases");
        let subnet = (Ipv4Addr::new(10, 9, 0, 0), 29); // .1 - .6
        let taken: BTreeSet<_> = [Ipv4Addr::new(10, 9, 0, 2)].into_iter().collect();
        let mut leases = Leases::open(&d).unwrap();
        let a = leases.reserve("a", "eth0", subnet, &taken).unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 9, 0, 1));
        assert_eq!(leases.reserve("a", "eth0", subnet, &taken).unwrap(), a, "ADD again: same");
        let b = leases.reserve("b", "eth0", subnet, &taken).unwrap();
        assert_eq!(b, Ipv4Addr::new(10, 9, 0, 3), "a registered address is skipped");
        assert_eq!(leases.release("a", "eth0").unwrap(), Some(a));
        assert_eq!(leases.release("a", "eth0").unwrap(), None, "DEL again: nothing");
        let c = leases.reserve("c", "eth0", subnet, &taken).unwrap();
        assert_eq!(c, Ipv4Addr::new(10, 9, 0, 4), "a released address waits its turn");
        for id in ["d", "e"] {
            leases.reserve(id, "eth0", subnet, &taken).unwrap();
        }
        let f = leases.reserve("f", "eth0", subnet, &taken).unwrap();
        assert_eq!(f, a, "then wraps around to free ones");
        let e = leases.reserve("g", "eth0", subnet, &taken).unwrap_err();
        assert_eq!(e.code, code::NO_ADDRESS);
        let mut ips: Vec<_> = leases.all().into_iter().map(|l| l.ip).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 5);
        fs::remove_dir_all(&d).unwrap();
    }
}
