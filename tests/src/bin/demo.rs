//! `cargo xtask demo`: a denied connection becomes allowed by a policy entry
//! and is cut and denied again when the entry is removed, on veth pairs in
//! network namespaces this demo creates (and removes).

use std::{process::ExitCode, time::Duration};

use integration_tests::{
    agent::DataplaneCli,
    pins::PinDir,
    require_root,
    topology::Host,
    traffic::{LONG, SHORT, echo_once, tcp_connect, tcp_echo_server, tcp_echo_works},
};

fn main() -> ExitCode {
    require_root();
    let host = Host::new(2);
    let pins = PinDir::new();
    let (frontend, backend) = (host.container(0), host.container(1));
    println!("host namespace {}; containers (silk layout, /32 + host route):", host.ns.name());
    println!("  frontend {} on host veth {} (app tag 1)", frontend.ip, frontend.host_ifname);
    println!(
        "  backend  {} on host veth {} (app tag 2), TCP echo server on :8080\n",
        backend.ip, backend.host_ifname
    );
    let cli = DataplaneCli::new(&host, &pins).echoing();
    cli.attach(0, 1);
    cli.attach(1, 2);
    tcp_echo_server(&backend.ns, backend.ip, 8080);

    let mut ok = true;
    let mut expect = |what: &str, allowed: bool, want: bool| {
        let shown = if allowed { "ALLOWED" } else { "DENIED" };
        let mark = if allowed == want { "" } else { "   <-- unexpected" };
        println!("  => {what}: {shown}{mark}");
        ok &= allowed == want;
    };

    let works = tcp_echo_works(&frontend.ns, backend.ip, 8080, SHORT);
    expect("frontend -> backend tcp/8080, no policy", works, false);

    cli.policy("allow", 1, 2, "tcp", "8080-8090");
    let mut stream = tcp_connect(&frontend.ns, None, backend.ip, 8080, LONG).ok();
    let works = stream.as_mut().is_some_and(echo_once);
    expect("frontend -> backend tcp/8080, after allow 8080-8090", works, true);
    let works = tcp_echo_works(&backend.ns, frontend.ip, 8080, SHORT);
    expect("backend -> frontend tcp/8080 (policies are one-way)", works, false);

    cli.policy("revoke", 1, 2, "tcp", "8080-8090");
    if let Some(stream) = stream.as_mut() {
        stream.set_read_timeout(Some(Duration::from_secs(1))).ok();
    }
    let works = stream.as_mut().is_some_and(echo_once);
    expect("the connection opened before the revoke, next message", works, false);
    let works = tcp_echo_works(&frontend.ns, backend.ip, 8080, SHORT);
    expect("frontend -> backend tcp/8080, after revoke", works, false);

    cli.run(&["status"]);
    if ok {
        println!("demo: every verdict was as expected");
        ExitCode::SUCCESS
    } else {
        println!("demo: some verdicts were not as expected");
        ExitCode::FAILURE
    }
}
