//! The part's section of results.md: the tables 10a to 10d and the plot,
//! from what `run` measured.

use std::time::Duration;

use super::{
    Agent, Level, OTHERS_PORT, SCALE_APPS, SCALE_PORTS, Scale, Setup, cpu::CpuTime, latency,
};
use crate::{
    compare::UDP_PORT,
    report::{Plot, Report, Series, ms, outln, percentile},
};

/// Writes the section and the plot into `report` (and prints them).
pub fn write(
    report: &mut Report,
    setup: &Setup,
    agents: &[Agent],
    results: &[Level],
    idle: &[(Agent, CpuTime)],
    scale: &Scale,
) {
    let mut out = String::new();
    outln!(
        out,
        "\n### 10. On a Cloud Foundry cell, against vxlan-policy-agent\n\nOne silk overlay of CF's own programs (`integration_tests::silk`: silk-controller, a silk-daemon per cell, CF's policy server; containers made by CF's cni-wrapper-plugin → silk-cni → host-local), set up in {:.1} s. Cell 1 runs CF's vxlan-policy-agent with the config the harness renders as `two-cells.sh` does (`poll_interval` {} s, CF's default); cell 2 runs this agent started from that same file (`policy-agent run --vxlan-policy-agent-config`, so the same {} s); cell 3 runs this agent from a copy with `poll_interval` 1 (this agent's own default). Every cell has app-a and app-b in a container each; everything measured is between the two on the same cell (across cells this agent fails closed for now). The other policies are written into the policy server's database (`put_policies_to_app_in_bulk`): that many new apps, each allowed to app-b on tcp/{OTHERS_PORT}, so every agent fetches and enforces all of them. vxlan-policy-agent sorts its allow rules by their JSON text (destination IP, then the port as text, then the source app's guid: silk-release `planner_linux.go`); the others share the UDP stream's port and half their names sort before app-a, so app-a's udp rule sits in the middle of the chain (10b says where), where a random Cloud Foundry app guid puts it on average.\n",
        setup.took.as_secs_f64(),
        setup.vpa_interval.as_secs(),
        setup.vpa_interval.as_secs(),
    );
    write_latency(&mut out, agents, results, setup.trials);
    write_udp(&mut out, results, setup.udp);
    write_idle(&mut out, idle, setup.window, setup.others);
    write_scale(&mut out, scale);
    let (vpa, ours) = scale.forced;
    report.figure_vs(
        "cf_60k_policies_forced_poll_s",
        ours.as_secs_f64(),
        "s",
        "vxlan-policy-agent",
        vpa.as_secs_f64(),
    );
    report.figure("cf_60k_policies_apply_s", scale.ours.0, "s");
    report.section(out);
    report.plot(latency_plot(agents, results));
}

/// (p50, p99, max) of the times that came, and how many did not.
fn spread(times: &[Option<Duration>]) -> Option<(Duration, Duration, Duration, usize)> {
    let mut came: Vec<Duration> = times.iter().flatten().copied().collect();
    came.sort();
    let missed = times.len() - came.len();
    let max = *came.last()?;
    Some((percentile(&came, 0.5), percentile(&came, 0.99), max, missed))
}

fn write_latency(out: &mut String, agents: &[Agent], results: &[Level], trials: u16) {
    outln!(
        out,
        "#### 10a. A write to the first connection it allows\n\nFrom a write of app-a → app-b tcp/PORT at the policy server's external API (`cf add-network-policy`'s request; a new port each trial, {trials} trials spread over a whole number of 5 s poll intervals, one at a random time in each of as many equal slots, so that they fall evenly at every phase of every agent's polls; the trials overlap, each policy deleted again once every cell has connected, at most {} in force at once, which bounds the probes running) to the first TCP connection from app-a to app-b:PORT the cell accepts (a connect every 20 ms from each cell's app-a, all cells at once). The agents poll, so this is mostly the wait for the next poll. The issue's goal: p99 ≤ 2 × poll interval.\n",
        latency::MAX_TRIALS_IN_FORCE
    );
    outln!(
        out,
        "| other policies | agent | poll interval | p50 | p99 | max | p50 against vxlan-policy-agent | p99 ≤ 2 × interval |"
    );
    outln!(out, "|---:|---|---:|---:|---:|---:|---:|---|");
    for level in results {
        let vpa = spread(&level.times[0]);
        for (agent, times) in agents.iter().zip(&level.times) {
            let interval = agent.interval.as_secs_f64();
            let Some((p50, p99, max, missed)) = spread(times) else {
                outln!(
                    out,
                    "| {} | {} | {interval} s | - | - | - | - | none within 30 s |",
                    level.others,
                    agent.label
                );
                continue;
            };
            let ratio = vpa.map_or("-".to_owned(), |(v50, ..)| {
                format!("{:.2}x", p50.as_secs_f64() / v50.as_secs_f64())
            });
            let goal = if p99.as_secs_f64() <= 2.0 * interval { "yes" } else { "no" };
            let missed =
                if missed > 0 { format!(" ({missed} not within 30 s)") } else { String::new() };
            outln!(
                out,
                "| {} | {} | {interval} s | {} | {} | {} | {ratio} | {goal} ({:.2} × interval){missed} |",
                level.others,
                agent.label,
                ms(p50),
                ms(p99),
                ms(max),
                p99.as_secs_f64() / interval,
            );
        }
    }
}

fn write_udp(out: &mut String, results: &[Level], (runs, secs): (usize, f64)) {
    outln!(
        out,
        "\n#### 10b. UDP packets/s between app-a and app-b on a cell\n\nOne pinned sender in app-a, 32-byte datagrams to app-b:{UDP_PORT} (`compare::udp_pps_between`), {secs} s per run, median of {runs} runs interleaved, with the policies of 10a in force (the other policies and app-a → app-b udp): cell 1 through vxlan-policy-agent's iptables chain at FORWARD's top, cell 2 through this agent's chain (its veths let through) and its programs on the veths (cell 3 runs the same programs).\n"
    );
    outln!(
        out,
        "| other policies | app-a's rule in vxlan-policy-agent's chain | vxlan-policy-agent (iptables) | policy-agent (eBPF) | ratio |"
    );
    outln!(out, "|---:|---:|---:|---:|---:|");
    for level in results {
        let (vpa, ours) = level.pps;
        let (at, rules) = level.udp_rule;
        outln!(
            out,
            "| {} | {at} of {rules} | {vpa:.0} | {ours:.0} | {:.2}x |",
            level.others,
            ours / vpa
        );
    }
}

fn write_idle(out: &mut String, rows: &[(Agent, CpuTime)], window: Duration, others: u32) {
    outln!(
        out,
        "\n#### 10c. CPU per idle poll\n\nEach agent's CPU time over {} s without writes, {others} other policies in force: the process's threads (its CPU clock, exited threads included) and the children it waited for (iptables), divided by the polls of the policy server in the window (window / poll interval; ±1, so coarse at 5 s). Cell 1, 2 and 3 measured in the same window; then vxlan-policy-agent restarted with `poll_interval` 1 (the harness rewrites its config) and measured again beside cell 3. Everything the process does in the window counts (both also poll security groups every 60 s). Both keep one connection to the policy server open between polls (this agent's client: `policy-agent/src/cf/client.rs`, HTTP/1.1 keep-alive); the children's CPU is counted in clock ticks (10 ms), so one iptables run in the window outweighs the polls of a quick run: compare the threads.\n",
        window.as_secs()
    );
    outln!(
        out,
        "| agent | poll interval | polls | CPU (threads + children) | per poll | against vxlan-policy-agent at that interval |"
    );
    outln!(out, "|---|---:|---:|---:|---:|---:|");
    let per_poll = |interval: Duration, cpu: CpuTime| {
        let polls = (window.as_secs_f64() / interval.as_secs_f64()).round().max(1.0);
        (polls, cpu.total().as_secs_f64() * 1e3 / polls)
    };
    for &(agent, cpu) in rows {
        let (polls, each) = per_poll(agent.interval, cpu);
        let peer = rows.iter().find(|(a, _)| a.peer && a.interval == agent.interval);
        let ratio = match peer {
            Some(&(_, peer)) if !agent.peer => {
                format!("{:.2}x", each / per_poll(agent.interval, peer).1)
            }
            _ => "-".to_owned(),
        };
        outln!(
            out,
            "| {} | {} s | {polls:.0} | {} + {} | {each:.2} ms | {ratio} |",
            agent.label,
            agent.interval.as_secs(),
            ms(cpu.threads),
            ms(cpu.children),
        );
    }
}

fn write_scale(out: &mut String, scale: &Scale) {
    let (vpa, ours) = scale.forced;
    outln!(
        out,
        "\n#### 10d. 60,000 policies of 20,000 apps\n\n{SCALE_APPS} new apps, each allowed to app-b on tcp {SCALE_PORTS:?}: {} policies written into the policy server's database in one transaction ({:.2} s), all touching app-b, so both agents fetch all of them (vxlan-policy-agent asks only for its containers' apps and spaces). From only app-a → app-b udp in force, cells 1 and 2 polled in turn with `/force-policy-poll-cycle`, which both answer once the cycle is done (cell 3's agent stopped; both restarted to poll once an hour, so that the forced poll is the one that fetches and applies).\n",
        SCALE_APPS as usize * SCALE_PORTS.len(),
        scale.written.as_secs_f64(),
    );
    outln!(out, "| | vxlan-policy-agent | policy-agent | ratio |");
    outln!(out, "|---|---:|---:|---:|");
    outln!(
        out,
        "| forced poll, call to answer | {:.2} s | {:.2} s | {:.1}x faster |",
        vpa.as_secs_f64(),
        ours.as_secs_f64(),
        vpa.as_secs_f64() / ours.as_secs_f64()
    );
    outln!(
        out,
        "| the poll's fetch and apply (`status`: `policy_server.last_poll_seconds`) | - | {:.2} s | |",
        scale.ours.0
    );
    outln!(
        out,
        "| in force afterwards | {} rules in its `vpa--` chain | {} policies, {} apps | |",
        scale.vpa_rules,
        scale.ours.1,
        scale.ours.2
    );
}

fn latency_plot(agents: &[Agent], results: &[Level]) -> Plot {
    let series = agents
        .iter()
        .enumerate()
        .map(|(i, agent)| Series {
            label: format!("{} ({} s poll), p99", agent.label, agent.interval.as_secs()),
            points: results
                .iter()
                .filter_map(|level| {
                    let (_, p99, ..) = spread(&level.times[i])?;
                    Some((f64::from(level.others), p99.as_secs_f64() * 1e3))
                })
                .collect(),
        })
        .collect();
    Plot {
        file: "cf_write_to_connection.png",
        title: "On a CF cell: policy server write to first allowed connection (p99)".into(),
        x_label: "other policies to app-b",
        y_label: "ms",
        log_y: false,
        series,
    }
}
