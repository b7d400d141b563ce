//! A write at the policy server's external API to the first TCP
//! connection it allows, on each cell at once: the agents poll, so the
//! time is mostly the wait for the next poll, spread over one interval by
//! where the write falls in it.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    ops::Range,
    thread::ScopedJoinHandle,
    time::{Duration, Instant},
};

use integration_tests::{
    cf::{Policy, PolicyServer},
    silk::SilkContainer,
};
use rand::{Rng as _, rngs::StdRng};

use super::cell::Subject;

/// How often a probe tries to connect.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// A try's own limit: a refused connection (no policy: vxlan-policy-agent's
/// REJECT, the programs' reject) answers at once.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// When a probe gives up: the policy counts as never in force.
const GIVE_UP: Duration = Duration::from_secs(30);
/// The writes' average spacing before their span is rounded up to whole
/// poll intervals: the trials overlap (each has its own port), so that a
/// write need not wait a whole interval for the one before to show.
const WRITE_GAP: Duration = Duration::from_millis(700);

/// One write of app-a → app-b tcp PORT per port of `ports`, at the
/// external API, spread over a whole number of the longest poll interval
/// of `subjects`: write k at a random time in the k-th of as many equal
/// slots (stratified), so that the writes fall evenly at every phase of
/// every agent's polls. Each trial has a listener in every app-b and a
/// probe per cell connecting from app-a every 20 ms; once every cell has
/// connected, its policy is deleted at the external API again, and a write
/// waits while [`MAX_TRIALS_IN_FORCE`] trials' are. For each subject, the times from
/// the writes to their first accepted connections (None: not within
/// 30 s), in no particular order.
pub fn write_to_connection(
    server: &PolicyServer,
    subjects: &[Subject],
    ports: Range<u16>,
    rng: &mut StdRng,
) -> Vec<Vec<Option<Duration>>> {
    let longest = subjects.iter().map(|s| s.interval).max().unwrap_or(Duration::from_secs(1));
    let trials = ports.len() as u32;
    let cycles = (WRITE_GAP * trials).as_secs_f64() / longest.as_secs_f64();
    let slot = longest.mul_f64(cycles.ceil().max(1.0)) / trials;
    // Held, never accepted from: the kernel completes a probe's handshake
    // into the backlog, and that is all a probe waits for.
    let _listeners: Vec<Vec<TcpListener>> = subjects
        .iter()
        .map(|s| {
            let ip = s.b.ip;
            s.b.ns.run(|| ports.clone().map(|port| TcpListener::bind((ip, port))).collect())
        })
        .collect::<Result<_, _>>()
        .expect("listen in app-b");
    let mut times = vec![Vec::new(); subjects.len()];
    let first = Instant::now();
    std::thread::scope(|scope| {
        let mut in_force: Vec<Trial> = Vec::new();
        for (k, port) in ports.enumerate() {
            let at = first + slot.mul_f64(k as f64 + rng.random::<f64>());
            loop {
                retire(server, &mut in_force, &mut times, false);
                if Instant::now() >= at && in_force.len() < MAX_TRIALS_IN_FORCE {
                    break;
                }
                let wait = at.saturating_duration_since(Instant::now());
                std::thread::sleep(if wait.is_zero() {
                    RETIRE_EVERY
                } else {
                    wait.min(RETIRE_EVERY)
                });
            }
            let start = Instant::now();
            server.add_policies(&[trial_policy(port)]);
            let probes = subjects
                .iter()
                .map(|subject| {
                    let (from, to) = (&subject.a, subject.b.ip);
                    scope.spawn(move || first_connection(from, to, port, start))
                })
                .collect();
            in_force.push(Trial { port, probes });
        }
        retire(server, &mut in_force, &mut times, true);
    });
    times
}

/// A trial whose policy is in force: its port and a probe per subject.
struct Trial<'scope> {
    port: u16,
    probes: Vec<ScopedJoinHandle<'scope, Option<Duration>>>,
}

/// At most this many trials' policies in force at once (each runs a probe
/// per cell), as many as before port ranges per pair were lifted to
/// [`policy_common::maps::MAX_PORT_RANGES`].
pub const MAX_TRIALS_IN_FORCE: usize = 12;
/// How often a waiting write looks for trials done.
const RETIRE_EVERY: Duration = Duration::from_millis(10);

fn trial_policy(port: u16) -> Policy<'static> {
    ("app-a", "app-b", "tcp", port, port)
}

/// Takes the times of the trials every probe of which has finished (with
/// `all`, of every trial, waiting for them) into `times`, by subject, and
/// deletes their policies at the external API.
fn retire(
    server: &PolicyServer,
    in_force: &mut Vec<Trial>,
    times: &mut [Vec<Option<Duration>>],
    all: bool,
) {
    let (done, running): (Vec<Trial>, Vec<Trial>) = std::mem::take(in_force)
        .into_iter()
        .partition(|trial| all || trial.probes.iter().all(ScopedJoinHandle::is_finished));
    *in_force = running;
    if done.is_empty() {
        return;
    }
    let policies: Vec<Policy> = done.iter().map(|trial| trial_policy(trial.port)).collect();
    for trial in done {
        for (subject, probe) in trial.probes.into_iter().enumerate() {
            times[subject].push(probe.join().expect("a probe"));
        }
    }
    server.delete_policies(&policies);
}

/// Connects from `from` to `to:port` every 20 ms until one is accepted:
/// the time since `start` (None: not within 30 s).
fn first_connection(
    from: &SilkContainer,
    to: Ipv4Addr,
    port: u16,
    start: Instant,
) -> Option<Duration> {
    let target = SocketAddr::from((to, port));
    from.ns.run(|| {
        loop {
            let tried = Instant::now();
            if TcpStream::connect_timeout(&target, CONNECT_TIMEOUT).is_ok() {
                return Some(start.elapsed());
            }
            if start.elapsed() > GIVE_UP {
                return None;
            }
            std::thread::sleep(PROBE_EVERY.saturating_sub(tried.elapsed()));
        }
    })
}
