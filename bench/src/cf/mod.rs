//! On a Cloud Foundry cell, against vxlan-policy-agent: one silk overlay
//! (`integration_tests::silk`, CF's own silk-controller, silk-daemons,
//! cni-wrapper-plugin and policy server), cell 1 with CF's
//! vxlan-policy-agent, cell 2 with this agent started from the cell's
//! rendered vxlan-policy-agent config (its poll interval), cell 3 with
//! this agent from a copy polling every second (its own default); app-a
//! and app-b in a container each on every cell. Same-cell traffic only:
//! across cells this agent fails closed for now.
//! 1. a write at the policy server's external API to the first
//!    connection it allows, with 10 to 10,000 other policies to app-b;
//! 2. UDP packets/s app-a → app-b: vxlan-policy-agent's iptables chain
//!    against the programs, the same policies in force;
//! 3. CPU per idle poll;
//! 4. 60,000 policies of 20,000 apps, all to app-b: the forced poll that
//!    fetches and applies them.

mod cell;
pub(crate) mod cpu;
mod latency;
mod tables;

use std::time::{Duration, Instant};

use integration_tests::{
    cf::PolicyServer,
    silk::{CellAgent, Overlay},
};
use rand::SeedableRng as _;

use self::{
    cell::{Subject, force_poll},
    cpu::CpuTime,
};
use crate::{
    compare::{UDP_PORT, median, udp_pps_between},
    report::Report,
};

/// The other policies' port, tcp: the UDP stream's, so that app-a's udp
/// rule sorts among theirs in vxlan-policy-agent's chain (see
/// [`set_level`]).
const OTHERS_PORT: u16 = UDP_PORT;
/// The first trial's port (each trial has its own).
const FIRST_TRIAL_PORT: u16 = 20_000;
/// Part 4: 20,000 apps, each to app-b on three ports.
const SCALE_APPS: u32 = 20_000;
const SCALE_PORTS: [u16; 3] = [9001, 9002, 9003];
/// Part 4's agents poll once an hour (the longest this agent takes), so
/// that the forced poll is the one that fetches and applies.
const SCALE_POLL_SECONDS: u64 = 3600;

/// An agent as the tables name it: label, poll interval, whether it is
/// vxlan-policy-agent (the peer).
#[derive(Clone, Copy)]
struct Agent {
    label: &'static str,
    interval: Duration,
    peer: bool,
}

impl Agent {
    fn of(subject: &Subject) -> Self {
        Self { label: subject.label, interval: subject.interval, peer: subject.daemon.is_none() }
    }
}

/// Part 1 at one count of other policies: per subject, its times.
struct Level {
    others: u32,
    times: Vec<Vec<Option<Duration>>>,
    /// UDP packets/s, median: vxlan-policy-agent's cell, this agent's.
    pps: (f64, f64),
    /// Where app-a → app-b udp's rule is in vxlan-policy-agent's chain:
    /// (position from 1, rules).
    udp_rule: (usize, usize),
}

pub fn run(quick: bool, report: &mut Report) {
    let trials: u16 = if quick { 10 } else { 40 };
    let udp = if quick { (3, 1.0) } else { (5, 3.0) };
    let window = Duration::from_secs(if quick { 10 } else { 30 });
    let started = Instant::now();
    let overlay = Overlay::start();
    let server = overlay.policy_server();
    let mut subjects = vec![
        Subject::vxlan_policy_agent(overlay.add_cell(1, CellAgent::VxlanPolicyAgent)),
        Subject::ours(overlay.add_cell(2, CellAgent::None), None),
        Subject::ours(overlay.add_cell(3, CellAgent::None), Some(1)),
    ];
    let vpa_interval = subjects[0].interval;
    let setup = started.elapsed();
    let agents: Vec<Agent> = subjects.iter().map(Agent::of).collect();

    let mut rng = rand::rngs::StdRng::seed_from_u64(5_000_001);
    let levels: [u32; 4] = [10, 100, 1_000, 10_000];
    let results: Vec<Level> = levels
        .iter()
        .zip((FIRST_TRIAL_PORT..).step_by(trials.into()))
        .map(|(&others, first)| {
            let ports = first..first + trials;
            measure_level(server, &subjects, others, ports, udp, &mut rng)
        })
        .collect();
    let idle = idle(&mut subjects, window);

    // 4. 60,000 policies: cell 3's agent stopped, so that only the agent
    // measured fetches at a time.
    subjects[2].daemon = None;
    for subject in &mut subjects[..2] {
        subject.restart(SCALE_POLL_SECONDS);
    }
    let scale = scale(server, &subjects[..2]);

    let setup = Setup { took: setup, vpa_interval, trials, udp, window, others: levels[3] };
    tables::write(report, &setup, &agents, &results, &idle, &scale);
}

/// 1 and 2 with `others` other policies: the writes' times on every cell
/// (a trial per port of `ports`), then UDP packets/s on cells 1 and 2
/// (cell 3 runs the same programs as 2), `udp`: (runs, seconds each),
/// interleaved.
fn measure_level(
    server: &PolicyServer,
    subjects: &[Subject],
    others: u32,
    ports: std::ops::Range<u16>,
    (runs, secs): (usize, f64),
    rng: &mut rand::rngs::StdRng,
) -> Level {
    set_level(server, subjects, others);
    let times = latency::write_to_connection(server, subjects, ports, rng);
    let mut pps = [Vec::new(), Vec::new()];
    for _ in 0..runs {
        for (subject, out) in subjects.iter().zip(&mut pps) {
            let (a, b) = (&subject.a, &subject.b);
            out.push(udp_pps_between(&a.ns, &b.ns, b.ip, secs));
        }
    }
    let [vpa, ours] = pps.map(median);
    Level { others, times, pps: (vpa, ours), udp_rule: vpa_udp_rule(&subjects[0]) }
}

/// 3: every agent's CPU over `window` as it is; then vxlan-policy-agent
/// restarted polling every second, and it and cell 3's agent (the same
/// interval) over another `window`. Each with the agent as it was then.
fn idle(subjects: &mut [Subject], window: Duration) -> [(Agent, CpuTime); 4] {
    let pids: Vec<u32> = subjects.iter().map(Subject::agent_pid).collect();
    let slow = cpu::over_window(&pids, window);
    let before: Vec<Agent> = subjects.iter().map(Agent::of).collect();
    subjects[0].restart(1);
    // Past the restart's own work (its chain rebuilt).
    std::thread::sleep(Duration::from_secs(2));
    let fast = cpu::over_window(&[subjects[0].agent_pid(), subjects[2].agent_pid()], window);
    [
        (before[0], slow[0]),
        (before[1], slow[1]),
        (Agent::of(&subjects[0]), fast[0]),
        (Agent::of(&subjects[2]), fast[1]),
    ]
}

/// Sets what is in force for a level: of the policies to app-b, only
/// app-a → app-b udp (the UDP stream's) and `others` from as many new
/// apps, tcp on the same port; then a forced poll on every cell, each
/// done when the set is in force. vxlan-policy-agent sorts its allow
/// rules by their JSON text (silk-release `vxlan-policy-agent/planner/
/// planner_linux.go`, `destinationSlice.Less`: destination IP, then the
/// port as text, then the source app's guid): half the new apps are named
/// to sort before app-a (`aN-`), half after (`zN-`), so that app-a's rule
/// sits in the middle, where a random Cloud Foundry app guid would put it
/// on average.
fn set_level(server: &PolicyServer, subjects: &[Subject], others: u32) {
    server.delete_policies_to_app("app-b");
    server.add_policies(&[("app-a", "app-b", "udp", UDP_PORT, UDP_PORT)]);
    let before = others / 2;
    for (prefix, count) in [("a", before), ("z", others - before)] {
        let prefix = format!("{prefix}{others}-");
        server.put_policies_to_app_in_bulk(&prefix, count, "app-b", &[OTHERS_PORT]);
    }
    for subject in subjects {
        force_poll(&subject.cell);
    }
}

/// How the part ran, as its section says.
struct Setup {
    /// The overlay and cells up.
    took: Duration,
    vpa_interval: Duration,
    trials: u16,
    /// UDP: (runs, seconds each).
    udp: (usize, f64),
    /// The idle CPU windows.
    window: Duration,
    /// Other policies in force while idle.
    others: u32,
}

/// Part 4's figures.
struct Scale {
    written: Duration,
    /// The forced poll, call to answer: vxlan-policy-agent's, this agent's.
    forced: (Duration, Duration),
    /// This agent's status after it: `last_poll_seconds`, policies, apps.
    ours: (f64, u64, u64),
    /// Rules in vxlan-policy-agent's chain after its poll.
    vpa_rules: usize,
}

/// From only app-a → app-b udp in force, 60,000 policies to app-b written
/// at once, then a forced poll on each cell in turn (this agent's first).
fn scale(server: &PolicyServer, subjects: &[Subject]) -> Scale {
    server.delete_policies_to_app("app-b");
    server.add_policies(&[("app-a", "app-b", "udp", UDP_PORT, UDP_PORT)]);
    for subject in subjects {
        force_poll(&subject.cell);
    }
    let start = Instant::now();
    server.put_policies_to_app_in_bulk("scale-", SCALE_APPS, "app-b", &SCALE_PORTS);
    let written = start.elapsed();
    let ours_forced = force_poll(&subjects[1].cell);
    let daemon = subjects[1].daemon.as_ref().expect("this agent on cell 2");
    let status = &daemon.get("/v1/status")["policy_server"];
    let ours = (
        status["last_poll_seconds"].as_f64().unwrap_or(f64::NAN),
        status["set"]["policies"].as_u64().unwrap_or(0),
        status["set"]["apps"].as_u64().unwrap_or(0),
    );
    let vpa_forced = force_poll(&subjects[0].cell);
    let vpa_rules = vpa_rules(&subjects[0]).len();
    Scale { written, forced: (vpa_forced, ours_forced), ours, vpa_rules }
}

/// The rules of vxlan-policy-agent's chain (`vpa--TIMESTAMP`) on its cell.
fn vpa_rules(subject: &Subject) -> Vec<String> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", subject.cell.ns().path().display()))
        .args(["iptables", "-w", "-S"])
        .output()
        .expect("iptables -S");
    let rules = String::from_utf8_lossy(&out.stdout);
    rules.lines().filter(|l| l.starts_with("-A vpa--")).map(str::to_owned).collect()
}

/// Where app-a → app-b udp's allow rule is in vxlan-policy-agent's chain:
/// (position from 1, rules; position 0: not there).
fn vpa_udp_rule(subject: &Subject) -> (usize, usize) {
    let rules = vpa_rules(subject);
    let udp = format!("-p udp -m udp --dport {UDP_PORT} ");
    let at = rules.iter().position(|rule| rule.contains(&udp)).map_or(0, |i| i + 1);
    (at, rules.len())
}
