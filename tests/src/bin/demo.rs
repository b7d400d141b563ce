//! `cargo xtask demo`: the product as its users meet it. A platform
//! operator starts the agent on a host and registers two containers; an
//! app developer sees a connection denied, allows it with
//! `add-network-policy`, maps an internal route, resolves it with `dig`,
//! reaches the app over platform TLS with `curl`, and asks why another
//! attempt was denied (`flows`, `explain`). Everything runs in network
//! namespaces this demo creates, and is removed when it ends.

use std::{process::ExitCode, time::Duration};

use integration_tests::{
    daemon::{Daemon, policy_args, register_args},
    netns::NetNs,
    require_root,
    topology::{GATEWAY, Host},
    traffic::http_server,
};

/// Prints a command as the user would type it, then its output.
fn show(prompt: &str, command: &str, output: &str) {
    println!("{prompt} {command}");
    for line in output.lines() {
        println!("    {line}");
    }
}

/// Runs `policy-agent ARGS` against the demo daemon, shown as typed.
fn agent(daemon: &Daemon, args: &[&str]) -> String {
    let out = daemon.cli(args);
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    show("operator$", &format!("policy-agent {}", args.join(" ")), &text);
    text
}

/// Runs a client inside a container, shown as typed there; returns
/// (success, output).
fn in_container(ns: &NetNs, name: &str, program: &str, args: &[&str]) -> (bool, String) {
    let out = ns.command(program).args(args).output().expect("run a client");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    show(&format!("{name}$"), &format!("{program} {}", args.join(" ")), &text);
    (out.status.success(), text)
}

fn main() -> ExitCode {
    require_root();
    let host = Host::new(2);
    let (frontend, backend) = (host.container(0), host.container(1));
    println!(
        "A host (network namespace {}) with two containers in the silk layout:",
        host.ns.name()
    );
    println!("  frontend {} (host veth {})", frontend.ip, frontend.host_ifname);
    println!(
        "  backend  {} (host veth {}), an HTTP app on :8080\n",
        backend.ip, backend.host_ifname
    );
    http_server(&backend.ns, backend.ip, 8080, "hello from backend\n");
    frontend.ns.use_nameserver(GATEWAY);
    let daemon = Daemon::start(&host.ns, "log_level = \"warn\"");
    let ca = daemon.state_dir().join("ca.pem").display().to_string();
    println!(
        "The agent runs on the host: policy-agent run (state, API socket and pins of its own).\n"
    );

    let mut ok = true;
    let mut expect = |what: &str, happened: bool, want: bool| {
        let mark = if happened == want { "as expected" } else { "NOT AS EXPECTED" };
        println!("  => {what}: {mark}\n");
        ok &= happened == want;
    };
    let url = format!("http://{}:8080/", backend.ip);
    let curl = |extra: &[&str], url: &str| {
        let mut args = vec!["-sS", "--max-time", "2"];
        args.extend_from_slice(extra);
        args.push(url);
        in_container(&frontend.ns, "frontend", "curl", &args)
    };

    println!("-- The container runtime registers each container (as a CNI plugin would):");
    for (c, app) in [(frontend, "frontend"), (backend, "backend")] {
        let args = register_args(c, app);
        agent(&daemon, &args.iter().map(String::as_str).collect::<Vec<_>>());
    }
    println!();

    println!("-- Containers are isolated until a policy allows a flow:");
    let (reached, _) = curl(&[], &url);
    expect("frontend cannot reach backend:8080", reached, false);

    println!("-- The app developer allows frontend to reach backend on tcp 8080:");
    agent(&daemon, &policy_args("add-network-policy", "frontend", "backend", "tcp", "8080"));
    let (reached, _) = curl(&[], &url);
    expect("frontend reaches backend:8080", reached, true);

    println!("-- An internal route names the app; the agent answers its DNS:");
    agent(&daemon, &["map-route", "backend", "apps.internal", "--hostname", "backend"]);
    let (_, answer) = in_container(
        &frontend.ns,
        "frontend",
        "dig",
        &[&format!("@{GATEWAY}"), "+short", "+time=2", "+tries=1", "backend.apps.internal"],
    );
    expect(
        "backend.apps.internal resolves to backend's address",
        answer.contains(&backend.ip.to_string()),
        true,
    );

    println!(
        "-- Platform TLS on 61443, with a certificate for the route (the policy on 8080 allows it):"
    );
    let (reached, body) = curl(&["--cacert", &ca], "https://backend.apps.internal:61443/");
    expect(
        "TLS to backend.apps.internal:61443 verifies and reaches the app",
        reached && body.contains("hello"),
        true,
    );

    println!("-- A port no policy allows, and why:");
    let (reached, _) = curl(&[], &format!("http://{}:9000/", backend.ip));
    expect("frontend cannot reach backend:9000", reached, false);
    std::thread::sleep(Duration::from_millis(300));
    let flows = agent(&daemon, &["flows", "--denied", "--app", "backend"]);
    expect("the denied attempt is in the flow log", flows.contains("9000"), true);
    let explained = agent(
        &daemon,
        &["explain", &frontend.ip.to_string(), &backend.ip.to_string(), "tcp", "9000"],
    );
    expect("explain names the ports backend allows", explained.contains("8080"), true);

    println!("-- Removing the policy cuts the flow again:");
    agent(&daemon, &policy_args("remove-network-policy", "frontend", "backend", "tcp", "8080"));
    let (reached, _) = curl(&[], &url);
    expect("frontend cannot reach backend:8080 any more", reached, false);

    agent(&daemon, &["status"]);
    drop(daemon);
    if ok {
        println!(
            "demo: everything behaved as expected; the namespaces, pins and state are removed"
        );
        ExitCode::SUCCESS
    } else {
        println!("demo: something did not behave as expected");
        ExitCode::FAILURE
    }
}
