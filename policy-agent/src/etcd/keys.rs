//! The cluster's keys in etcd, all under the configured prefix (default
//! `/policy-agent`), named in one place:
//!
//! - `log/NNNNNNNNNNNNNNNNNNNN`: change N (20 digits, so keys sort in order);
//! - `log/head`: N, the newest change;
//! - `log/id`: the log's identity (`{"id","base","host"}`, see
//!   [`crate::store::lineage::LogId`]), written with the log's first change or by a
//!   republish. `head` and `id` sort after the entries, so one range read
//!   from an entry returns the entries, the head and the id at one revision;
//! - `snapshots/NNNNNNNNNNNNNNNNNNNN/PPPPPP` and `.../parts`: the state at
//!   change N in parts, completed by the `parts` key;
//! - `hosts/NAME`: a host's record, under its lease;
//! - `subnets/I`: the host holding the overlay's /24 number I;
//! - `cas/NAME`: a host's platform CA certificate (never its key);
//! - `ca`: where older agents kept one CA for the whole cluster, with its
//!   key; deleted on sight. It sorts right before `cas/`, so one range
//!   read from it returns it and every host's CA.

/// The keys of one cluster (one prefix).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The keys under `prefix` (a trailing `/` is ignored).
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.trim_end_matches('/').to_owned() }
    }

    /// The prefix, without a trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every key of the log: entries, head and id.
    pub fn log(&self) -> String {
        format!("{}/log/", self.prefix)
    }

    pub fn entry(&self, seq: u64) -> String {
        format!("{}/log/{seq:020}", self.prefix)
    }

    /// Past the last possible entry (`:` sorts right after `9`), before
    /// `head` and `id`.
    pub fn entries_end(&self) -> String {
        format!("{}/log/:", self.prefix)
    }

    pub fn head(&self) -> String {
        format!("{}/log/head", self.prefix)
    }

    pub fn log_id(&self) -> String {
        format!("{}/log/id", self.prefix)
    }

    pub fn snapshots(&self) -> String {
        format!("{}/snapshots/", self.prefix)
    }

    /// The snapshot at change `seq` (a folder: its parts, then `parts`).
    pub fn snapshot(&self, seq: u64) -> String {
        format!("{}{seq:020}/", self.snapshots())
    }

    pub fn hosts(&self) -> String {
        format!("{}/hosts/", self.prefix)
    }

    pub fn host(&self, name: &str) -> String {
        format!("{}{name}", self.hosts())
    }

    pub fn subnets(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    pub fn subnet(&self, index: u8) -> String {
        format!("{}{index}", self.subnets())
    }

    pub fn cas(&self) -> String {
        format!("{}/cas/", self.prefix)
    }

    /// Host `name`'s CA certificate.
    pub fn ca(&self, name: &str) -> String {
        format!("{}{name}", self.cas())
    }

    pub fn legacy_ca(&self) -> String {
        format!("{}/ca", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_sort_before_the_head_and_the_id_and_inside_their_range() {
        let keys = Keys::new("/p/");
        assert_eq!(keys.entry(7), "/p/log/00000000000000000007");
        let (first, last) = (keys.entry(0), keys.entry(u64::MAX));
        assert!(keys.log() < first && last < keys.entries_end());
        assert!(keys.entries_end() < keys.head() && keys.head() < keys.log_id());
        assert_eq!(keys.snapshot(5), "/p/snapshots/00000000000000000005/");
        assert_eq!(
            (keys.host("cell-1"), keys.subnet(3)),
            ("/p/hosts/cell-1".into(), "/p/subnets/3".into())
        );
        assert_eq!((keys.ca("cell-1"), keys.legacy_ca()), ("/p/cas/cell-1".into(), "/p/ca".into()));
        assert!(keys.legacy_ca() < keys.cas() && keys.ca("cell-1") < keys.cas() + "\u{ff}");
    }
}
