//! The agent as an unlucky operator and an attacker meet it: torn and
//! damaged state files, a full disk, `kill -9` in the middle of a batch.
//! Each probe that once lost or invented state is a test here.

use std::{
    collections::BTreeSet,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    agent::agent_bin,
    daemon::Daemon,
    eventually, require_root,
    tmpfs::{Tmpfs, tmp_files},
    topology::Host,
    unique_name,
};
use policy_agent::Maps;
use rand::Rng as _;
use serde_json::{Value, json};

const POLICIES: &str = "/networking/v1/external/policies";

/// A CF policy body: `source` → `destination` on TCP `port`, for each.
fn body(policies: &[(String, String, u16)]) -> String {
    let list: Vec<Value> = policies
        .iter()
        .map(|(s, d, port)| {
            json!({"source": {"id": s}, "destination": {"id": d, "protocol": "tcp", "ports": {"start": port, "end": port}}})
        })
        .collect();
    json!({ "policies": list }).to_string()
}

fn one(source: &str, destination: &str, port: u16) -> String {
    body(&[(source.into(), destination.into(), port)])
}

/// Policies the API lists, as (source, destination, port).
fn listed(daemon: &Daemon) -> BTreeSet<(String, String, u64)> {
    let (status, v) = daemon.curl("GET", POLICIES, None);
    assert_eq!(status, 200, "{v}");
    v["policies"]
        .as_array()
        .expect("policies")
        .iter()
        .map(|p| {
            (
                p["source"]["id"].as_str().unwrap().to_owned(),
                p["destination"]["id"].as_str().unwrap().to_owned(),
                p["destination"]["ports"]["start"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// (source tag, destination tag, protocol) pairs in the kernel's policy
/// map (each test policy is its own pair).
fn kernel_pairs(daemon: &Daemon) -> usize {
    let maps = Maps::open_pinned(&daemon.maps_dir()).expect("open pinned maps");
    maps.pairs().iter().filter(|(_, allowances)| !allowances.is_empty()).count()
}

fn journal(daemon: &Daemon) -> PathBuf {
    daemon.state_dir().join("journal.jsonl")
}

#[test]
fn a_torn_tail_then_a_write_then_a_restart_loses_nothing() {
    require_root();
    let host = Host::new(1);
    let mut daemon = Daemon::start(&host.ns, "");
    assert_eq!(daemon.curl("POST", POLICIES, Some(&one("a", "b", 8080))).0, 200);
    daemon.stop();
    // A crash in the middle of an append: half a record, no newline.
    let mut f = std::fs::OpenOptions::new().append(true).open(journal(&daemon)).unwrap();
    f.write_all(b"2 1234abcd {\"change\":{\"add_policies\":[{\"sour").unwrap();
    drop(f);
    daemon.spawn();
    assert_eq!(daemon.curl("POST", POLICIES, Some(&one("a", "b", 8081))).0, 200);
    daemon.kill9();
    daemon.spawn();
    let want: BTreeSet<_> =
        [("a".into(), "b".into(), 8080), ("a".into(), "b".into(), 8081)].into_iter().collect();
    assert_eq!(listed(&daemon), want, "the write after the torn tail survives a restart");
    assert!(daemon.log().contains("cut a torn journal tail"), "{}", daemon.log());
}

#[test]
fn a_damaged_state_is_refused_at_start_and_rebuilt_by_the_operator() {
    require_root();
    let host = Host::new(1);
    let mut daemon = Daemon::start(&host.ns, "");
    for port in 1..=4 {
        let body = one("a", &format!("b{port}"), port);
        assert_eq!(daemon.curl("POST", POLICIES, Some(&body)).0, 200);
    }
    daemon.stop();
    // A middle record lost.
    let text = std::fs::read_to_string(journal(&daemon)).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.remove(3); // header, 1, 2, [3], 4
    std::fs::write(journal(&daemon), lines.join("\n") + "\n").unwrap();
    let refusal = daemon.spawn_fails();
    assert!(refusal.contains("journal.jsonl is damaged"), "{refusal}");
    assert!(refusal.contains("record 4 follows record 2: changes 3 to 3 are missing"), "{refusal}");
    let config = daemon.config.to_str().unwrap().to_owned();
    // The operator's choice: keep what is whole.
    let rebuilt = daemon.cli_ok(&["state", "rebuild", "--config", &config, "--from", "snapshot"]);
    assert!(rebuilt.contains("plus 2 journal records = change 2 (2 policies"), "{rebuilt}");
    daemon.spawn();
    assert_eq!(listed(&daemon).len(), 2);
    assert_eq!(kernel_pairs(&daemon), 2, "the kernel follows the rebuilt state");
    // While the agent runs, a rebuild is refused.
    let out = daemon.cli(&["state", "rebuild", "--config", &config, "--from", "snapshot"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another running agent"));
}

#[test]
fn a_full_disk_gets_507_applies_nothing_and_recovers_when_space_is_freed() {
    require_root();
    let host = Host::new(1);
    let mut daemon = Daemon::start(&host.ns, "");
    daemon.stop();
    let tmpfs = Tmpfs::mount(&daemon.state_dir(), "256k");
    daemon.spawn();
    // Records larger than a page: tmpfs hands out whole pages, and a small
    // record may still fit in the journal's last one.
    let big: Vec<(String, String, u16)> =
        (0..100).map(|k| (format!("src-{k}"), "b".to_owned(), 8080)).collect();
    assert_eq!(daemon.curl("POST", POLICIES, Some(&body(&big))).0, 200);
    let filler = tmpfs.fill();
    // A new batch and a delete: both refused, naming the directory.
    let more: Vec<(String, String, u16)> =
        (0..100).map(|k| (format!("src-{k}"), "b".to_owned(), 9090)).collect();
    let (status, reply) = daemon.curl("POST", POLICIES, Some(&body(&more)));
    assert_eq!(status, 507, "{reply}");
    let error = reply["error"].as_str().unwrap();
    assert!(error.contains("no space left in the state directory"), "{error}");
    assert!(error.contains(daemon.state_dir().to_str().unwrap()), "{error}");
    let (status, reply) = daemon.curl("POST", &format!("{POLICIES}/delete"), Some(&body(&big)));
    assert_eq!(status, 507, "{reply}");
    let before: BTreeSet<_> =
        big.iter().map(|(s, d, p)| (s.clone(), d.clone(), u64::from(*p))).collect();
    assert_eq!(listed(&daemon), before, "nothing applied");
    assert_eq!(kernel_pairs(&daemon), 100, "nothing applied in the kernel");
    // Space freed: writes work again, without a restart.
    std::fs::remove_file(filler).unwrap();
    assert_eq!(daemon.curl("POST", POLICIES, Some(&one("a", "b", 8081))).0, 200);
    daemon.kill9();
    daemon.spawn();
    let mut want = before;
    want.insert(("a".into(), "b".into(), 8081));
    assert_eq!(listed(&daemon), want, "the refused writes never reappear");
    assert_eq!(kernel_pairs(&daemon), 101);
    let leftovers = tmp_files(&daemon.state_dir());
    assert!(leftovers.is_empty(), "{leftovers:?}");
    daemon.kill9();
    drop(tmpfs);
}

#[test]
fn a_registration_whose_identity_cannot_be_stored_gets_507_and_a_lost_identity_is_rewritten() {
    require_root();
    let host = Host::new(2);
    let mut daemon = Daemon::start(&host.ns, "");
    daemon.stop();
    let instances = daemon.state_dir().join("instances");
    let tmpfs = Tmpfs::mount(&instances, "64k");
    daemon.spawn();
    let (first, second) = (host.container(0), host.container(1));
    let files = |ip: std::net::Ipv4Addr| {
        ["-cert.pem", "-key.pem", ".json"].map(|end| instances.join(format!("{ip}{end}")))
    };
    let registered = |daemon: &Daemon| -> Vec<String> {
        let listed = daemon.get("/v1/endpoints");
        listed["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["ip"].as_str().map(str::to_owned))
            .collect()
    };
    daemon.register(first, "web");
    assert!(files(first.ip).iter().all(|f| f.exists()), "the control's identity is written");

    // The instances' disk is full: the registration is refused, nothing
    // registered and nothing left behind.
    let filler = tmpfs.fill();
    let args = integration_tests::daemon::register_args(second, "api");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = daemon.cli(&args);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(said.contains("507") || said.contains("no space left"), "{said}");
    assert_eq!(registered(&daemon), vec![first.ip.to_string()], "nothing registered");
    assert!(files(second.ip).iter().all(|f| !f.exists()), "no identity left behind");
    let leftovers = tmp_files(&instances);
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Space again: the same registration goes through, identity written.
    std::fs::remove_file(&filler).unwrap();
    daemon.register(second, "api");
    assert!(files(second.ip).iter().all(|f| f.exists()));

    // An identity lost while the disk is full (the agent restarted onto
    // it) is written once there is space, without a restart.
    daemon.stop();
    for f in files(first.ip) {
        std::fs::remove_file(f).unwrap();
    }
    let filler = tmpfs.fill();
    daemon.spawn();
    assert!(files(first.ip).iter().any(|f| !f.exists()), "cannot be written yet");
    std::fs::remove_file(&filler).unwrap();
    assert!(
        eventually(Duration::from_secs(15), || files(first.ip).iter().all(|f| f.exists())),
        "written once space returns"
    );
    assert_eq!(daemon.instance_ports(first.ip)["CF_INSTANCE_IP"], first.ip.to_string());
    daemon.kill9();
    drop(tmpfs);
}

/// POSTs `body` with curl in the background; returns the child.
fn post_in_background(daemon: &Daemon, body_file: &Path) -> std::process::Child {
    Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "--unix-socket"])
        .arg(&daemon.socket)
        .args(["-H", "Content-Type: application/json", "--data-binary"])
        .arg(format!("@{}", body_file.display()))
        .arg(format!("http://localhost{POLICIES}"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl")
}

#[test]
fn kill_9_during_a_1000_policy_batch_is_all_or_nothing() {
    require_root();
    let host = Host::new(1);
    let mut daemon = Daemon::start(&host.ns, "");
    let mut rng = rand::rng();
    let runs = 20;
    let mut acknowledged = BTreeSet::new();
    let mut applied = 0;
    let mut window = Duration::from_millis(400);
    for run in 0..runs {
        let batch: Vec<(String, String, u16)> =
            (0..1000).map(|k| (format!("src-{run}-{k}"), format!("dst-{run}"), 8080)).collect();
        let file = daemon.dir.join(format!("batch-{run}.json"));
        std::fs::write(&file, body(&batch)).unwrap();
        let started = Instant::now();
        let curl = post_in_background(&daemon, &file);
        if run == 0 {
            // The first batch completes: how long one takes sets the window.
            let out = curl.wait_with_output().unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
            window = started.elapsed().mul_f64(1.5).max(Duration::from_millis(20));
            acknowledged.insert(run);
        } else {
            std::thread::sleep(window.mul_f64(rng.random::<f64>()));
            daemon.kill9();
            let out = curl.wait_with_output().unwrap();
            if String::from_utf8_lossy(&out.stdout) == "200" {
                acknowledged.insert(run);
            }
            daemon.spawn();
        }
        // After the restart: the batch is there whole or not at all, in
        // the API and in the kernel.
        let policies = listed(&daemon);
        let of_run = |r: usize| policies.iter().filter(|p| p.1 == format!("dst-{r}")).count();
        for r in 0..=run {
            let n = of_run(r);
            assert!(n == 0 || n == 1000, "run {r}: {n} of 1000 policies after a kill");
            if acknowledged.contains(&r) {
                assert_eq!(n, 1000, "run {r} was acknowledged");
            }
        }
        assert_eq!(kernel_pairs(&daemon), policies.len(), "kernel = state after run {run}");
        if of_run(run) == 1000 {
            applied += 1;
        }
    }
    println!(
        "kill -9 during a 1,000-policy batch: {runs} runs, {applied} applied whole, {} lost whole \
         (none acknowledged and lost), all-or-nothing in the API and the kernel every time",
        runs - applied
    );
}

#[test]
fn inputs_from_outside_are_checked_before_the_state_is_locked() {
    require_root();
    let host = Host::new(1);
    let daemon = Daemon::start(&host.ns, "");
    let container = host.container(0);
    // A FIFO as --netns: refused at once (it used to hang the agent while it
    // held the state lock), and the API keeps answering.
    let fifo = daemon.dir.join("not-a-netns");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a path the test owns.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut args = integration_tests::daemon::register_args(container, "app");
    let at = args.iter().position(|a| a == "--netns").unwrap() + 1;
    for (path, says) in [
        (fifo.to_str().unwrap().to_owned(), "is a FIFO, not a network namespace"),
        ("/etc/hostname".to_owned(), "is a file, not a network namespace"),
        ("/proc/self/ns/mnt".to_owned(), "another kind of namespace"),
    ] {
        args[at] = path;
        let started = Instant::now();
        let out = daemon.cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says) && stderr.contains("400"), "{stderr}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    assert_eq!(daemon.curl("GET", "/v1/endpoints", None), (200, json!({"endpoints": []})));
    // Ids that look like other ids.
    for id in ["db\u{200B}", "\u{202E}bd"] {
        let (status, reply) = daemon.curl("POST", POLICIES, Some(&one("a", id, 80)));
        assert_eq!(status, 400, "{reply}");
        assert!(reply["reason"].as_str().unwrap().contains("invisible or text-direction"));
    }
    // Booleans are true or false.
    let (status, reply) = daemon.curl("GET", "/v1/flows?follow=maybe", None);
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["field"], "follow");
    assert_eq!(daemon.curl("GET", "/v1/flows?follow=false", None).0, 200);
    // Removing a policy no packet matched is quiet (its counters are zero).
    assert_eq!(daemon.curl("POST", POLICIES, Some(&one("a", "b", 80))).0, 200);
    assert_eq!(daemon.curl("POST", &format!("{POLICIES}/delete"), Some(&one("a", "b", 80))).0, 200);
    assert!(!daemon.log().contains("cannot forget"), "{}", daemon.log());
}

/// `curl` in `ns` against the mTLS API: (HTTP status, body); status 0 when
/// the connection or handshake failed.
fn curl_tls(
    host: &Host,
    daemon: &Daemon,
    method: &str,
    path: &str,
    identity: Option<(&Path, &Path)>,
    body: Option<&str>,
) -> (u16, String) {
    let ca = daemon.state_dir().join("ca.pem");
    let mut cmd = host.ns.command("curl");
    cmd.args(["-s", "-S", "-X", method, "--cacert"]).arg(&ca).args(["-w", "\n%{http_code}"]);
    if let Some((cert, key)) = identity {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    if let Some(body) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", body]);
    }
    let out = cmd.arg(format!("https://127.0.0.1:9091{path}")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[test]
fn the_tcp_api_takes_only_platform_identities_and_their_roles() {
    require_root();
    let host = Host::new(1);
    let mut daemon = Daemon::start(&host.ns, "listen = \"0.0.0.0:9091\"");
    daemon.register(host.container(0), "app");
    let ops = daemon.api_identity("admin", "ops");
    let dashboard = daemon.api_identity("read-only", "dashboard");
    let policy = one("a", "b", 8080);
    // No certificate: the handshake is refused.
    let (status, said) = curl_tls(&host, &daemon, "GET", POLICIES, None, None);
    assert_eq!(status, 0, "{said}");
    // The admin identity reads and writes.
    let (status, said) =
        curl_tls(&host, &daemon, "POST", POLICIES, Some((&ops.0, &ops.1)), Some(&policy));
    assert_eq!(status, 200, "{said}");
    // The read-only one reads, and cannot write.
    let ro = Some((dashboard.0.as_path(), dashboard.1.as_path()));
    let (status, said) = curl_tls(&host, &daemon, "GET", POLICIES, ro, None);
    assert_eq!(status, 200, "{said}");
    assert!(said.contains("\"total_policies\":1"), "{said}");
    let (status, said) =
        curl_tls(&host, &daemon, "POST", &format!("{POLICIES}/delete"), ro, Some(&policy));
    assert_eq!(status, 403, "{said}");
    assert!(said.contains("read-only"), "{said}");
    // An instance identity (the platform CA's, given to every container) is
    // no API identity.
    let ip = host.container(0).ip;
    let instances = daemon.state_dir().join("instances");
    let instance =
        (instances.join(format!("{ip}-cert.pem")), instances.join(format!("{ip}-key.pem")));
    let (status, said) = curl_tls(
        &host,
        &daemon,
        "POST",
        POLICIES,
        Some((&instance.0, &instance.1)),
        Some(&one("app", "db", 5432)),
    );
    assert_eq!(status, 403, "{said}");
    assert!(said.contains("not an API identity"), "{said}");
    // A certificate of the platform CA naming two roles, admin first, is no
    // API identity either (it counted as its first role).
    let both = two_role_identity(&daemon);
    let (status, said) = curl_tls(
        &host,
        &daemon,
        "POST",
        POLICIES,
        Some((&both.0, &both.1)),
        Some(&one("app", "db", 5432)),
    );
    assert_eq!(status, 403, "{said}");
    assert!(said.contains("not an API identity"), "{said}");
    assert_eq!(listed(&daemon).len(), 1, "only the admin's write happened");

    // Plain HTTP beyond loopback: refused at start.
    daemon.stop();
    let mut toml = std::fs::read_to_string(&daemon.config).unwrap();
    toml = toml
        .replace("listen = \"0.0.0.0:9091\"", "listen = \"0.0.0.0:9091\"\nlisten_plaintext = true");
    std::fs::write(&daemon.config, toml).unwrap();
    let refusal = daemon.spawn_fails();
    assert!(refusal.contains("plain HTTP is allowed on loopback only"), "{refusal}");
}

/// Whether each CA file is in `dir`, and when it was last written.
fn ca_files(dir: &Path) -> Vec<Option<std::time::SystemTime>> {
    ["ca.pem", "ca-key.pem", "host-ca.pem", "host-ca-key.pem"]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).and_then(|m| m.modified()).ok())
        .collect()
}

#[test]
fn api_identity_mints_from_the_running_agents_ca_and_never_makes_one() {
    require_root();
    let scratch = std::env::temp_dir().join(unique_name("identity"));
    std::fs::create_dir_all(&scratch).unwrap();
    let out = scratch.join("out");
    let out_s = out.to_str().unwrap().to_owned();
    // Where a CA would be made without a configuration.
    let default_state = Path::new("/var/lib/policy-agent");
    let before = ca_files(default_state);
    let mint = |socket: &Path, extra: &[&str]| {
        Command::new(agent_bin())
            .args(["api-identity", "--role", "admin", "--name", "ops", "--out", &out_s])
            .args(extra)
            .env("POLICY_AGENT_SOCKET", socket)
            .current_dir(&scratch)
            .output()
            .unwrap()
    };

    // No agent answers and no --config: refused, saying what to do.
    let refused = mint(&scratch.join("agent.sock"), &[]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(said.contains("no agent answers at") && said.contains("--config FILE"), "{said}");
    assert!(said.contains("never makes one"), "{said}");
    assert!(!out.exists(), "no identity written");
    assert_eq!(ca_files(default_state), before, "no CA made under {}", default_state.display());

    // A configuration whose state directory has no CA (the agent never ran
    // with it): refused, none made.
    let config = scratch.join("agent.toml");
    let state = scratch.join("state");
    std::fs::write(&config, format!("state_dir = \"{}\"\n", state.display())).unwrap();
    let refused = mint(&scratch.join("agent.sock"), &["--config", config.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(said.contains(&format!("no platform CA in {}", state.display())), "{said}");
    assert_eq!(ca_files(&state), vec![None; 4], "no CA made in {}", state.display());

    // A running agent: its own CA mints, and its HTTPS API takes the
    // identity.
    let host = Host::new(1);
    let daemon = Daemon::start(&host.ns, "listen = \"0.0.0.0:9091\"");
    let minted = mint(&daemon.socket, &[]);
    assert!(minted.status.success(), "{}", String::from_utf8_lossy(&minted.stderr));
    let said = String::from_utf8_lossy(&minted.stdout);
    assert!(said.contains(&daemon.state_dir().join("ca.pem").display().to_string()), "{said}");
    let ops = (out.join("ops.pem"), out.join("ops-key.pem"));
    let (status, said) = curl_tls(&host, &daemon, "GET", POLICIES, Some((&ops.0, &ops.1)), None);
    assert_eq!(status, 200, "{said}");
    assert_eq!(ca_files(default_state), before, "still no CA made by the command");

    // An agent without a CA (no TLS listeners, no HTTPS API): refused.
    let bare_host = Host::new(1);
    let bare = Daemon::start(&bare_host.ns, "tls = false");
    let refused = mint(&bare.socket, &[]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && said.contains("has no platform CA"), "{said}");
    assert_eq!(ca_files(&bare.state_dir()), vec![None; 4]);
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// A client certificate from the agent's own platform CA whose subject
/// names both API roles (`OU=api:admin`, then `OU=api:read-only`).
fn two_role_identity(daemon: &Daemon) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = daemon.state_dir();
    let (key, csr, cert, ext) = (
        dir.join("both-key.pem"),
        dir.join("both.csr"),
        dir.join("both-cert.pem"),
        dir.join("both.ext"),
    );
    std::fs::write(&ext, "extendedKeyUsage=clientAuth\n").unwrap();
    let openssl = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new("openssl").args(args).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    openssl(&[
        os("ecparam"),
        os("-genkey"),
        os("-name"),
        os("prime256v1"),
        os("-noout"),
        os("-out"),
        key.as_os_str(),
    ]);
    openssl(&[
        os("req"),
        os("-new"),
        os("-key"),
        key.as_os_str(),
        os("-subj"),
        os("/OU=api:admin/OU=api:read-only/CN=both"),
        os("-out"),
        csr.as_os_str(),
    ]);
    openssl(&[
        os("x509"),
        os("-req"),
        os("-in"),
        csr.as_os_str(),
        os("-CA"),
        dir.join("ca.pem").as_os_str(),
        os("-CAkey"),
        dir.join("ca-key.pem").as_os_str(),
        os("-CAcreateserial"),
        os("-days"),
        os("1"),
        os("-extfile"),
        ext.as_os_str(),
        os("-out"),
        cert.as_os_str(),
    ]);
    (cert, key)
}
