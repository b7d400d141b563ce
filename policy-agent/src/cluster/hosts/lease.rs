//! This host's record in etcd, under a lease renewed every third of its
//! time: when the agent is gone for longer, the record expires.

use std::time::Duration;

use super::HostRecord;
use crate::etcd::{Etcd, EtcdError};

pub(super) struct Lease {
    etcd: Etcd,
    /// `hosts/NAME`.
    key: String,
    ttl: i64,
    /// The lease held (0: none; granted at the next report).
    id: i64,
}

impl Lease {
    /// A lease of `seconds` (at least 3) for the record at `key`.
    pub(super) fn new(etcd: Etcd, key: String, seconds: u32) -> Self {
        Self { etcd, key, ttl: i64::from(seconds.max(3)), id: 0 }
    }

    /// How often the record is reported again: a third of the lease time.
    pub(super) fn period(&self) -> Duration {
        Duration::from_secs((self.ttl / 3) as u64)
    }

    /// Renews the lease (or takes a new one where it expired) and writes
    /// `record` under it.
    pub(super) fn report(&mut self, record: &HostRecord) -> Result<(), EtcdError> {
        if self.id == 0 || !self.etcd.keep_alive(self.id)? {
            self.id = self.etcd.grant_lease(self.ttl)?;
        }
        let value = serde_json::to_vec(record).expect("host records serialize");
        self.etcd.put_if(&[], &[(&self.key, &value, self.id)])?;
        Ok(())
    }

    /// A round failed: take a new lease at the next report.
    pub(super) fn lost(&mut self) {
        self.id = 0;
    }
}
