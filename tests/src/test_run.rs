//! The `BPF_PROG_TEST_RUN` fixture of `tests/tests/test_run*.rs`: a fresh
//! namespace and a dataplane with three endpoints, the programs run on
//! crafted packets, and what the tests compare their answers with.

use std::net::Ipv4Addr;

use aya::programs::{TestRun as _, TestRunOptions};
use policy_agent::{Dataplane, Direction};
use policy_common::{Reason, maps::PairKey, ports::Allowance};

use crate::{
    netns::{EnteredNetNs, NetNs},
    pins::PinDir,
    require_root, unique_name,
};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const A: [u8; 4] = [10, 255, 0, 1];
pub const B: [u8; 4] = [10, 255, 0, 2];
pub const C: [u8; 4] = [10, 255, 0, 3];
pub const OUTSIDE: [u8; 4] = [169, 254, 0, 1];
pub const TAG_A: u32 = 1;
pub const TAG_B: u32 = 2;

/// A fresh namespace (test runs use its loopback as skb->dev) and a
/// dataplane with A (tag 1), B (tag 2) and C (tag 1) registered.
pub struct Fixture {
    pub dataplane: Dataplane,
    /// Where the maps are pinned.
    pub pins: PinDir,
    _in_ns: EnteredNetNs,
    _ns: NetNs,
}

impl Fixture {
    #[expect(
        clippy::new_without_default,
        reason = "it makes a namespace and loads the programs, as root: not a default value"
    )]
    pub fn new() -> Self {
        require_root();
        let ns = NetNs::new(unique_name("tr"));
        let in_ns = ns.enter();
        let pins = PinDir::new();
        let mut dataplane = pins.open();
        let t = dataplane.maps_mut();
        t.set_endpoint(Ipv4Addr::from(A), TAG_A).unwrap();
        t.set_endpoint(Ipv4Addr::from(B), TAG_B).unwrap();
        t.set_endpoint(Ipv4Addr::from(C), TAG_A).unwrap();
        Self { dataplane, pins, _in_ns: in_ns, _ns: ns }
    }

    pub fn allow(&mut self, src: u32, dst: u32, protocol: u8, start: u16, end: u16, id: u32) {
        self.dataplane
            .maps_mut()
            .allow(PairKey::new(src, dst, protocol), Allowance { start, end, policy_id: id })
            .unwrap();
    }

    pub fn entering_container(&self, frame: &[u8]) -> u32 {
        let prog = self.dataplane.tc_program(Direction::ToContainer);
        prog.test_run(TestRunOptions { data_in: Some(frame), ..Default::default() })
            .expect("test run")
            .return_value
    }

    pub fn leaving_container(&self, frame: &[u8]) -> u32 {
        let prog = self.dataplane.tc_program(Direction::FromContainer);
        prog.test_run(TestRunOptions { data_in: Some(frame), ..Default::default() })
            .expect("test run")
            .return_value
    }

    /// Runs the destination side; its return value and the packet as the
    /// program left it.
    pub fn entering_container_out(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog = self.dataplane.tc_program(Direction::ToContainer);
        let mut out = vec![0u8; 1500];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("test run");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Turns rejects on, at most `per_second` per sender.
    pub fn rejecting(mut self, per_second: u32) -> Self {
        use policy_agent::dataplane::{DataplaneConfig, DenyAction, DenySettings};
        let deny = DenySettings { action: DenyAction::Reject, rejects_per_second: per_second };
        let settings =
            DataplaneConfig { deny, ..DataplaneConfig::new("/unused") }.kernel_settings();
        self.dataplane.maps_mut().set_settings(settings).unwrap();
        self
    }

    pub fn count(&self, reason: Reason) -> u64 {
        self.dataplane.maps().verdict_count(reason).unwrap()
    }
}

pub fn verdict(ret: u32) -> &'static str {
    match ret {
        TC_ACT_OK => "pass",
        TC_ACT_SHOT => "drop",
        _ => "other",
    }
}

/// The Internet checksum over `bytes` (0 when they hold a correct one).
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
