//! `policy-cni`: a CNI plugin (spec 1.0.0 and 0.3.x/0.4.0) that gives a
//! container a veth, an address from this host's part of the overlay and
//! silk's routes, and registers it with the local policy-agent, which then
//! polices it like every endpoint.
//!
//! ADD: lease → veth → register → result. Any failure undoes what was done
//! (nothing is left behind). DEL: deregister → delete the veth → release;
//! idempotent, and complete after an ADD that crashed half-way. CHECK:
//! veth, address, default route and the agent's registration. VERSION,
//! STATUS (is the agent answering) and GC (leases and endpoints of
//! attachments no longer valid).

mod config;
mod error;
mod ipam;
mod link;

use std::{
    collections::BTreeSet,
    io::Read as _,
    net::{Ipv4Addr, Ipv6Addr},
};

use policy_api::{Client, GATEWAY, GATEWAY6, link::mac_text, netns, wire};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::{
    config::{Env, NetConf, SUPPORTED_VERSIONS},
    error::{CniError, Result, code},
    ipam::Leases,
};

fn main() {
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    // The version errors are reported in: the config's when it parses.
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "1.0.0".to_owned());
    match run(&stdin) {
        Ok(Some(out)) => println!("{out}"),
        Ok(None) => {}
        Err(e) => {
            println!("{}", e.json(&version));
            eprintln!("policy-cni: {e}");
            std::process::exit(1);
        }
    }
}

fn run(stdin: &[u8]) -> Result<Option<Value>> {
    let env = Env::from_env()?;
    if env.command == "VERSION" {
        return Ok(Some(json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS})));
    }
    let conf = NetConf::parse(stdin)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::io("cannot start a runtime", e))?;
    match env.command.as_str() {
        "ADD" => runtime.block_on(add(&conf, &env)).map(Some),
        "DEL" => runtime.block_on(del(&conf, &env)).map(|()| None),
        // CHECK came with spec 0.4.0: older configs cannot ask for it (as
        // the reference plugins' skeleton answers).
        "CHECK" if conf.cni_version.starts_with("0.3.") => Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {} does not allow CHECK (0.4.0 and later do)", conf.cni_version),
        )),
        "CHECK" => runtime.block_on(check(&conf, &env)).map(|()| None),
        "STATUS" => status(&conf).map(|()| None),
        "GC" => runtime.block_on(gc(&conf)).map(|()| None),
        other => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("CNI_COMMAND {other:?} is not ADD, DEL, CHECK, VERSION, STATUS or GC"),
        )),
    }
}

/// The agent's API, or "try again later" naming the socket; the reply in
/// its shape.
fn agent<T: DeserializeOwned>(
    conf: &NetConf,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<T> {
    let socket = conf.socket();
    let response = Client::new(&socket).request(method, path, body).map_err(|e| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            format!("policy-agent is not answering on {} - is it running?", socket.display()),
        )
        .details(e)
    })?;
    if !response.is_success() {
        return Err(CniError::new(
            code::AGENT_REFUSED,
            format!(
                "policy-agent refused {method} {path}: {} (HTTP {})",
                response.error(),
                response.status
            ),
        ));
    }
    serde_json::from_value(response.body).map_err(|e| {
        CniError::new(
            code::AGENT_REFUSED,
            format!("policy-agent answered {method} {path} in an unknown shape: {e} - is it the same version?"),
        )
    })
}

/// A request body in its shape.
fn body(shape: &impl serde::Serialize) -> Value {
    serde_json::to_value(shape).unwrap_or(Value::Null)
}

/// Where addresses come from and the MTU: the config's, else the agent's.
fn addressing(conf: &NetConf) -> Result<((Ipv4Addr, u8), Option<u32>)> {
    let ipam: wire::Ipam = agent(conf, "GET", "/v1/ipam", None)?;
    let subnet = match (conf.subnet.as_deref(), ipam.subnet.as_deref()) {
        (Some(s), _) | (None, Some(s)) => config::parse_subnet(s)?,
        (None, None) => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "no subnet: set \"subnet\" in the network configuration (the agent's overlay_network is off)",
            ));
        }
    };
    let mtu = conf.mtu.filter(|m| *m > 0).or(ipam.mtu);
    Ok((subnet, mtu))
}

/// The endpoints the agent has (registered by hand, by this plugin, in a
/// cluster also on other hosts).
fn endpoints(conf: &NetConf) -> Result<Vec<wire::Endpoint>> {
    let list: wire::Endpoints = agent(conf, "GET", "/v1/endpoints", None)?;
    Ok(list.endpoints)
}

/// Their addresses: a lease skips them.
fn addresses(endpoints: &[wire::Endpoint]) -> BTreeSet<Ipv4Addr> {
    endpoints.iter().filter_map(|e| e.ip.as_deref()?.parse().ok()).collect()
}

/// The write replies whose content the plugin does not need.
type Ignored = serde::de::IgnoredAny;

async fn add(conf: &NetConf, env: &Env) -> Result<Value> {
    env.require_attachment(true)?;
    let netns_path = env.netns.clone().expect("checked");
    let ns = netns::open(&netns_path)
        .map_err(|e| CniError::new(code::INVALID_ENVIRONMENT, format!("CNI_NETNS: {e}")))?;
    let (app, _from) = conf.app(&env.args);
    policy_api::check_app_id(&app)
        .map_err(|e| CniError::new(code::INVALID_CONFIG, format!("app id {app:?}: {e}")))?;
    let (subnet, mtu) = addressing(conf)?;
    let prefix6 = conf.ipv6_prefix.as_deref().map(config::parse_ipv6_prefix).transpose()?;
    let listed = endpoints(conf)?;
    let host_ifname = env.host_ifname();
    let mut leases = Leases::open(&conf.lease_dir())?;
    let ip = leases.reserve(&env.container_id, &env.ifname, subnet, &addresses(&listed))?;
    let ip6 = prefix6.map(|p| p.address_of(ip));
    // What this ADD made, so that a failure undoes exactly that: never a
    // veth or a registration it did not make (a refused registration may
    // have been refused because the address or veth is another's).
    let (mut made_veth, mut registered) = (false, false);
    let made = async {
        // Containers route through the host, as the reference ptp plugin
        // and silk arrange.
        enable_forwarding(ip6.is_some())?;
        clear_leftover(conf, &host_ifname, &ns, ip, &listed).await?;
        let plumbing = link::create(&host_ifname, &env.ifname, &ns, ip, GATEWAY, mtu).await?;
        made_veth = true;
        if let Some(ip6) = ip6 {
            link::add_ipv6(&host_ifname, &env.ifname, &ns, ip6).await?;
        }
        let ips: Vec<String> =
            std::iter::once(ip.to_string()).chain(ip6.map(|a| a.to_string())).collect();
        // NetIn: the agent takes garden's keys and the CNI convention's.
        let mappings = &conf.runtime_config.port_mappings;
        let endpoint = wire::Endpoint {
            ip: None,
            ips: Some(ips),
            app: app.clone(),
            ifname: host_ifname.clone(),
            netns: Some(netns_path.clone()),
            host: None,
            port_mappings: (!mappings.is_empty()).then(|| mappings.clone()),
            ports: None,
            instance_cert: None,
            instance_key: None,
            space_id: conf.garden("space_id"),
            container_workload: conf.garden("container_workload"),
        };
        let answer: Value = agent(conf, "POST", "/v1/endpoints", Some(&body(&endpoint)))?;
        registered = true;
        // NetOut: the app's security groups, as the runtime passed them,
        // set only once the registration succeeded, so a refused ADD
        // changes no group. Groups are the app's, not the container's: set
        // first and restored on a refusal, they would give the app's
        // running containers the refused container's groups until the
        // restore, and the restore could undo groups a concurrent ADD of
        // the same app set meanwhile (or fail and leave them). In this
        // order the new container is policed by its app's current groups
        // (none: unchecked, as any app without groups) until the PUT, and
        // it has no default route before `route_out` below: until its own
        // groups apply it reaches nothing but its gateway. (Only a netlink
        // failure in that last step comes after the PUT: the registration
        // is undone, the groups the agent accepted for the app stay.)
        //
        // With Cloud Foundry's dynamic security groups (the agent syncs
        // them from the policy server for a container in a space), the
        // app's groups already hold when the registration is answered:
        // the runtime's static ones are not set over them.
        let synced = answer.get("security_groups").and_then(Value::as_str) == Some("policy_server");
        if let Some(rules) = conf.runtime_config.net_out_rules.as_ref().filter(|_| !synced) {
            let rules = body(&wire::NetOutRules { rules: rules.clone() });
            agent::<Ignored>(conf, "PUT", &format!("/v1/asgs/{app}"), Some(&rules))?;
        }
        link::route_out(&env.ifname, &ns, GATEWAY, ip6.is_some()).await?;
        Ok::<_, CniError>(plumbing)
    }
    .await;
    let plumbing = match made {
        Ok(p) => p,
        Err(e) => {
            // Nothing left behind: the registration, the veth, the lease.
            if registered {
                let _ = agent::<Ignored>(conf, "DELETE", &format!("/v1/endpoints/{ip}"), None);
            }
            if made_veth {
                let _ = link::remove(&host_ifname).await;
            }
            let _ = leases.release(&env.container_id, &env.ifname);
            return Err(e);
        }
    };
    Ok(result(conf, env, &host_ifname, ip, ip6, &plumbing))
}

/// A veth of this container's name that is already there is removed only
/// when it is this container's own leftover (an ADD that stopped half-way,
/// or a runtime trying ADD again): its other end is still in the host's
/// namespace (the ADD stopped before moving it: no container has it) or in
/// this ADD's namespace, and no endpoint of another address is registered
/// on it. Anything else belongs to another container (or is not a veth):
/// ADD fails and leaves it alone. (With the CRC32 names of earlier
/// versions, an ADD for a colliding container id deleted its victim's veth
/// and registered itself there.)
async fn clear_leftover(
    conf: &NetConf,
    host_ifname: &str,
    ns: &std::fs::File,
    ip: Ipv4Addr,
    listed: &[wire::Endpoint],
) -> Result<()> {
    let Some(peer) = link::peer(host_ifname, Some(ns)).await? else { return Ok(()) };
    let holder = listed.iter().find(|e| e.ifname == host_ifname);
    let held = |why: String| {
        Err(CniError::new(
            code::VETH_HELD,
            format!(
                "the host-side veth {host_ifname} is held by another container ({why}); ADD does not take it over"
            ),
        ))
    };
    match (peer, holder) {
        (link::Peer::NotVeth, _) => {
            return Err(CniError::new(
                code::VETH_HELD,
                format!(
                    "interface {host_ifname} exists and is not a veth; ADD does not take it over"
                ),
            ));
        }
        (link::Peer::Elsewhere, _) => {
            return held("its other end is in another network namespace".into());
        }
        (_, Some(e)) if e.ip.as_deref() != Some(&ip.to_string()) => {
            return held(format!(
                "endpoint {} of app {} is registered on it",
                e.ip.as_deref().unwrap_or_default(),
                e.app
            ));
        }
        (link::Peer::Host | link::Peer::ThisContainer, _) => {}
    }
    if holder.is_some() {
        // This container's own registration, on the veth about to go: the
        // one this ADD makes then attaches to the new veth.
        agent::<Ignored>(conf, "DELETE", &format!("/v1/endpoints/{ip}"), None)?;
    }
    link::remove(host_ifname).await?;
    Ok(())
}

/// This container's host-side veth, if there, by its name or the CRC32
/// name an earlier version gave it (containers made before an upgrade):
/// only a veth shown to be this container's, as another container's may
/// have the same old name (and DEL follows a failed ADD, whose name may be
/// another's). Shown by its other end: still in the host's namespace (no
/// container has it), or in the container's namespace `ns` (when the
/// runtime still has it); or by the host routing the container's leased
/// address through it (the /32 route ADD made).
async fn host_veth(
    env: &Env,
    ns: Option<&std::fs::File>,
    lease: Option<Ipv4Addr>,
) -> Result<Option<String>> {
    for name in [env.host_ifname(), env.legacy_host_ifname()] {
        let ours = match link::peer(&name, ns).await? {
            None | Some(link::Peer::NotVeth) => false,
            Some(link::Peer::Host | link::Peer::ThisContainer) => true,
            Some(link::Peer::Elsewhere) => match lease {
                Some(ip) => link::routes_to(&name, ip).await?,
                None => false,
            },
        };
        if ours {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// IPv4 forwarding, and IPv6's for dual-stack containers.
fn enable_forwarding(ipv6: bool) -> Result<()> {
    let mut paths = vec![("/proc/sys/net/ipv4/ip_forward", "IPv4")];
    if ipv6 {
        paths.push(("/proc/sys/net/ipv6/conf/all/forwarding", "IPv6"));
    }
    for (path, family) in paths {
        if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        std::fs::write(path, "1")
            .map_err(|e| CniError::io(format!("cannot enable {family} forwarding"), e))?;
    }
    Ok(())
}

/// The ADD result, in the shape of the configuration's spec version.
fn result(
    conf: &NetConf,
    env: &Env,
    host_ifname: &str,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
    p: &link::Plumbing,
) -> Value {
    let old = conf.cni_version.starts_with("0.");
    let mut address =
        json!({"address": format!("{ip}/32"), "gateway": GATEWAY.to_string(), "interface": 1});
    if old {
        address["version"] = json!("4");
    }
    let mut ips = vec![address];
    let mut routes = vec![json!({"dst": "0.0.0.0/0", "gw": GATEWAY.to_string()})];
    if let Some(ip6) = ip6 {
        let mut address6 = json!({"address": format!("{ip6}/128"), "gateway": GATEWAY6.to_string(), "interface": 1});
        if old {
            address6["version"] = json!("6");
        }
        ips.push(address6);
        routes.push(json!({"dst": "::/0", "gw": GATEWAY6.to_string()}));
    }
    json!({
        "cniVersion": conf.cni_version,
        "interfaces": [
            {"name": host_ifname, "mac": mac_text(&p.host_mac)},
            {"name": env.ifname, "mac": mac_text(&p.container_mac), "sandbox": env.netns},
        ],
        "ips": ips,
        "routes": routes,
        "dns": {"nameservers": conf.dns_servers},
    })
}

async fn del(conf: &NetConf, env: &Env) -> Result<()> {
    env.require_attachment(false)?;
    let mut leases = Leases::open(&conf.lease_dir())?;
    let lease = leases.find(&env.container_id, &env.ifname);
    // The runtime may have removed the namespace already (its veths go
    // with it).
    let ns = env.netns.as_deref().and_then(|p| netns::open(p).ok());
    let host_ifname = host_veth(env, ns.as_ref(), lease).await?;
    if let Some(ip) = lease {
        // Deregistered before the lease is released: the address is never
        // handed to another container while the agent still names it.
        agent::<Ignored>(conf, "DELETE", &format!("/v1/endpoints/{ip}"), None)?;
    }
    if let Some(host_ifname) = host_ifname {
        link::remove(&host_ifname).await?;
    }
    leases.release(&env.container_id, &env.ifname)?;
    Ok(())
}

async fn check(conf: &NetConf, env: &Env) -> Result<()> {
    env.require_attachment(true)?;
    let ns = netns::open(env.netns.as_deref().expect("checked"))
        .map_err(|e| CniError::new(code::INVALID_ENVIRONMENT, format!("CNI_NETNS: {e}")))?;
    let ip =
        Leases::open(&conf.lease_dir())?.find(&env.container_id, &env.ifname).ok_or_else(|| {
            CniError::new(
                code::CHECK_FAILED,
                format!("no lease for {} {}", env.container_id, env.ifname),
            )
        })?;
    let host_ifname =
        host_veth(env, Some(&ns), Some(ip)).await?.unwrap_or_else(|| env.host_ifname());
    link::check(&host_ifname, &env.ifname, &ns, ip, GATEWAY).await?;
    let (app, _) = conf.app(&env.args);
    let registered = endpoints(conf)?.iter().any(|e| {
        e.ip.as_deref() == Some(&ip.to_string()) && e.app == app && e.ifname == host_ifname
    });
    if !registered {
        return Err(CniError::new(
            code::CHECK_FAILED,
            format!("policy-agent has no endpoint {ip} of app {app} on {host_ifname}"),
        ));
    }
    Ok(())
}

fn status(conf: &NetConf) -> Result<()> {
    agent::<Ignored>(conf, "GET", "/v1/ipam", None)
        .map(|_| ())
        .map_err(|e| CniError::new(code::NOT_AVAILABLE, e.msg).details(e.details))
}

/// Releases every lease (and its endpoint and veth) whose attachment is
/// not in `cni.dev/valid-attachments`.
async fn gc(conf: &NetConf) -> Result<()> {
    let Some(valid) = &conf.valid_attachments else { return Ok(()) };
    let mut leases = Leases::open(&conf.lease_dir())?;
    for lease in leases.all() {
        if valid.iter().any(|a| a.container_id == lease.container_id && a.ifname == lease.ifname) {
            continue;
        }
        let env = Env {
            command: "GC".into(),
            container_id: lease.container_id.clone(),
            netns: None,
            ifname: lease.ifname.clone(),
            args: String::new(),
        };
        let host_ifname = host_veth(&env, None, Some(lease.ip)).await?;
        agent::<Ignored>(conf, "DELETE", &format!("/v1/endpoints/{}", lease.ip), None)?;
        if let Some(host_ifname) = host_ifname {
            link::remove(&host_ifname).await?;
        }
        leases.release(&lease.container_id, &lease.ifname)?;
    }
    Ok(())
}
