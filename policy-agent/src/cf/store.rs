//! Cloud Foundry's container metadata store (`cni_datastore_path`), read
//! as vxlan-policy-agent reads it: `store.json` is one JSON object keyed
//! by container handle (`{"handle","ip","metadata":{"policy_group_id",
//! "space_id","container_workload",...}}`) that garden-external-networker
//! (cni-wrapper-plugin) rewrites in place under an exclusive `flock` on
//! `store.json_lock`, then bumps the integer in `store.json_version`
//! (missing or empty: 1). A reader compares the version first and takes
//! the same exclusive lock to read the data (the writer truncates and
//! rewrites the file, so an unlocked read could see half of it).
//!
//! Each container is attached at the host interface that routes its
//! address (silk's `s-...` veth: `10.255.91.2 dev s-010255091002`), as
//! its endpoint of app `policy_group_id`; entries without one are not
//! policed, as in Cloud Foundry.

use std::{
    collections::BTreeMap,
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// One container as the store lists it (the keys the agent reads).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    pub handle: String,
    pub ip: Ipv4Addr,
    /// `policy_group_id`: the app policies name.
    pub app: String,
    pub space: Option<String>,
    /// `container_workload`: `app`, `task` or `staging`.
    pub workload: Option<String>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    ip: String,
    #[serde(default)]
    metadata: BTreeMap<String, serde_json::Value>,
}

/// One read of the store: the containers to police, and the entries left
/// out (why).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Read {
    pub containers: Vec<Container>,
    pub skipped: Vec<String>,
}

pub struct MetadataStore {
    path: PathBuf,
    /// The version last read (None: never read).
    version: Option<u64>,
}

impl MetadataStore {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf(), version: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sibling(&self, suffix: &str) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    }

    /// `store.json_version`: missing or empty is 1.
    fn current_version(&self) -> Result<u64, String> {
        let path = self.sibling("_version");
        match std::fs::read_to_string(&path) {
            Ok(text) if text.trim().is_empty() => Ok(1),
            Ok(text) => text
                .trim()
                .parse()
                .map_err(|_| format!("{} holds {text:?}, not a version number", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(1),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// The containers, if the store changed since the last read (None:
    /// unchanged). Entries without `policy_group_id` or with an address
    /// that is not IPv4 are left out and named in the second list.
    pub fn read_if_changed(&mut self) -> Result<Option<Read>, String> {
        let version = self.current_version()?;
        if self.version == Some(version) {
            return Ok(None);
        }
        let lock_path = self.sibling("_lock");
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
        flock_exclusive(&lock).map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
        let data = match std::fs::read(&self.path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", self.path.display())),
        };
        // Read again under the lock: the version that goes with the data.
        let version = self.current_version()?;
        drop(lock);
        let entries: BTreeMap<String, Entry> = if data.iter().all(u8::is_ascii_whitespace) {
            BTreeMap::new()
        } else {
            serde_json::from_slice(&data).map_err(|e| {
                format!("{} is not the metadata store's JSON: {e}", self.path.display())
            })?
        };
        let (containers, skipped) = containers_of(entries);
        self.version = Some(version);
        Ok(Some(Read { containers, skipped }))
    }
}

fn text(metadata: &BTreeMap<String, serde_json::Value>, key: &str) -> Option<String> {
    metadata.get(key).and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(str::to_owned)
}

fn containers_of(entries: BTreeMap<String, Entry>) -> (Vec<Container>, Vec<String>) {
    let mut containers = Vec::new();
    let mut skipped = Vec::new();
    for (handle, entry) in entries {
        let Some(app) = text(&entry.metadata, "policy_group_id") else {
            continue; // not policed, as in Cloud Foundry
        };
        let Ok(ip) = entry.ip.parse::<Ipv4Addr>() else {
            skipped.push(format!("container {handle}: address {:?} is not IPv4", entry.ip));
            continue;
        };
        containers.push(Container {
            handle,
            ip,
            app,
            space: text(&entry.metadata, "space_id"),
            workload: text(&entry.metadata, "container_workload"),
        });
    }
    (containers, skipped)
}

fn flock_exclusive(file: &File) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor this function's caller owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The interface the main table routes `ip` to by a /32 (silk's route
/// to a container's host-side veth), from `/proc/net/route`.
pub fn routed_interface(ip: Ipv4Addr) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    interface_in(&table, ip)
}

/// `/proc/net/route` lists each route's destination and mask as the
/// kernel's `__be32` printed with `%08X`: the address's bytes reversed
/// on this little-endian machine, i.e. the native-endian u32 of its wire
/// bytes.
fn interface_in(table: &str, ip: Ipv4Addr) -> Option<String> {
    let want = format!("{:08X}", u32::from_ne_bytes(ip.octets()));
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (iface, destination, mask) = (fields.first()?, fields.get(1)?, fields.get(7)?);
        (*destination == want && *mask == "FFFFFFFF").then(|| (*iface).to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_as_garden_writes_it() {
        let dir = std::env::temp_dir().join(format!("cf-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("store.json");
        let mut store = MetadataStore::new(&path);
        // Missing: empty, version 1; then unchanged.
        assert_eq!(store.read_if_changed().unwrap(), Some(Read::default()));
        assert_eq!(store.read_if_changed().unwrap(), None);
        std::fs::write(
            &path,
            r#"{"h1":{"handle":"h1","ip":"10.255.91.2","metadata":{"policy_group_id":"app-a","space_id":"s1","container_workload":"app","ports":"8080"}},
                "h2":{"handle":"h2","ip":"10.255.91.3","metadata":{"app_id":"no-group"}},
                "h3":{"handle":"h3","ip":"fd00::1","metadata":{"policy_group_id":"app-b"}}}
"#,
        )
        .unwrap();
        // The data changed but not the version: not read yet (garden
        // bumps the version last).
        assert_eq!(store.read_if_changed().unwrap(), None);
        std::fs::write(dir.join("store.json_version"), "2").unwrap();
        let Read { containers, skipped } = store.read_if_changed().unwrap().unwrap();
        assert_eq!(
            containers,
            vec![Container {
                handle: "h1".into(),
                ip: Ipv4Addr::new(10, 255, 91, 2),
                app: "app-a".into(),
                space: Some("s1".into()),
                workload: Some("app".into()),
            }]
        );
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        std::fs::write(&path, "{not json").unwrap();
        std::fs::write(dir.join("store.json_version"), "3").unwrap();
        assert!(store.read_if_changed().unwrap_err().contains("not the metadata store's JSON"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_interface_routing_an_address() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            silk-vtep\t0000FF0A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
            s-010255091002\t025BFF0A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        assert_eq!(
            interface_in(table, Ipv4Addr::new(10, 255, 91, 2)).as_deref(),
            Some("s-010255091002")
        );
        assert_eq!(interface_in(table, Ipv4Addr::new(10, 255, 91, 3)), None);
        assert_eq!(interface_in(table, Ipv4Addr::new(10, 255, 0, 0)), None, "not a /32");
    }
}
