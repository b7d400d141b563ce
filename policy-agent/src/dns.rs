//! `apps.internal` DNS: `HOST.apps.internal` → A records of every instance
//! of the app the route names, shuffled, TTL 0 (changes show at the next
//! query). NXDOMAIN for unknown names in the zone, REFUSED for other zones
//! (not an open resolver), FORMERR for queries that cannot be parsed but
//! have a header; anything shorter is dropped. UDP and TCP. The wire format
//! is hickory-proto's.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    sync::Arc,
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{
        DNSClass, Name, RData, Record, RecordType,
        rdata::{A, AAAA},
    },
};
use rand::seq::SliceRandom as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, UdpSocket},
    sync::watch,
};
use tracing::{debug, info, warn};

use crate::{
    limits::{Backoff, Gate},
    state::INTERNAL_DOMAIN,
};

/// Largest UDP answer without EDNS (RFC 1035 4.2.1).
const UDP_LIMIT: usize = 512;
const HEADER_LEN: usize = 12;

/// Finds the addresses behind a hostname, both families (None: no such
/// route).
pub type Lookup = Arc<dyn Fn(&str) -> Option<Vec<IpAddr>> + Send + Sync>;

fn zone() -> Name {
    Name::from_ascii(format!("{INTERNAL_DOMAIN}.")).expect("a valid name")
}

/// The answer to one query message, or None to drop it.
pub fn answer(
    request: &[u8],
    lookup: &dyn Fn(&str) -> Option<Vec<IpAddr>>,
    udp: bool,
) -> Option<Vec<u8>> {
    let request = match Message::from_vec(request) {
        Ok(m) => m,
        Err(_) if request.len() >= HEADER_LEN && request[2] & 0x80 == 0 => {
            // A query we cannot parse: FORMERR with its id.
            let id = u16::from_be_bytes([request[0], request[1]]);
            return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr).to_vec().ok();
        }
        Err(_) => return None,
    };
    if request.metadata.message_type != MessageType::Query {
        return None; // never answer responses
    }
    let id = request.metadata.id;
    if request.metadata.op_code != OpCode::Query {
        return Message::error_msg(id, request.metadata.op_code, ResponseCode::NotImp)
            .to_vec()
            .ok();
    }
    let [query] = request.queries.as_slice() else {
        return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr).to_vec().ok();
    };
    let mut response = Message::response(id, OpCode::Query);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.add_query(query.clone());
    let name = query.name().to_lowercase();
    let zone = zone();
    if !zone.zone_of(&name) || query.query_class() != DNSClass::IN {
        response.metadata.response_code = ResponseCode::Refused;
        return response.to_vec().ok();
    }
    response.metadata.authoritative = true;
    // HOST.apps.internal: exactly one label above the zone.
    let host = (name.num_labels() == zone.num_labels() + 1)
        .then(|| name.iter().next().map(|l| String::from_utf8_lossy(l).into_owned()))
        .flatten();
    let Some(mut addresses) = host.as_deref().and_then(lookup) else {
        response.metadata.response_code = ResponseCode::NXDomain;
        return response.to_vec().ok();
    };
    // A for IPv4 instances, AAAA for IPv6 ones (dual-stack instances have
    // both), ANY both; a name without addresses of the asked family is
    // NOERROR with no answer.
    let (want_a, want_aaaa) = match query.query_type() {
        RecordType::A => (true, false),
        RecordType::AAAA => (false, true),
        RecordType::ANY => (true, true),
        _ => (false, false),
    };
    addresses.shuffle(&mut rand::rng());
    for ip in addresses {
        let rdata = match ip {
            IpAddr::V4(a) if want_a => RData::A(A(a)),
            IpAddr::V6(a) if want_aaaa => RData::AAAA(AAAA(a)),
            _ => continue,
        };
        response.add_answer(Record::from_rdata(query.name().clone(), 0, rdata));
    }
    let bytes = response.to_vec().ok()?;
    if udp && bytes.len() > UDP_LIMIT {
        // Too many instances for a plain UDP answer: the client retries
        // over TCP.
        response.answers.clear();
        response.metadata.truncation = true;
        return response.to_vec().ok();
    }
    Some(bytes)
}

/// A UDP socket bound with IP_FREEBIND, so the agent can listen on the
/// containers' gateway address before any veth carries it.
fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::from(new_socket(libc::SOCK_DGRAM)?);
    set_freebind(socket.as_raw_fd())?;
    bind_raw(socket.as_raw_fd(), addr)?;
    Ok(socket)
}

/// A non-blocking IPv4 socket of `kind`, owned.
fn new_socket(kind: libc::c_int) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain socket(2).
    let fd =
        unsafe { libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

fn set_freebind(fd: i32) -> std::io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: valid option pointer and length.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_FREEBIND,
            &one as *const _ as *const _,
            size_of::<libc::c_int>() as u32,
        )
    };
    if ret != 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

fn bind_raw(fd: i32, addr: SocketAddr) -> std::io::Result<()> {
    let SocketAddr::V4(v4) = addr else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "DNS listens on IPv4"));
    };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid sockaddr_in of the size passed.
    let ret = unsafe {
        libc::bind(
            fd,
            &sa as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if ret != 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::from(new_socket(libc::SOCK_STREAM)?);
    let fd = listener.as_raw_fd();
    let one: libc::c_int = 1;
    // SAFETY: valid option pointer and length.
    unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one as *const _ as *const _, 4)
    };
    set_freebind(fd)?;
    bind_raw(fd, addr)?;
    // SAFETY: listen on a bound socket.
    if unsafe { libc::listen(listener.as_raw_fd(), 128) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(listener)
}

/// The UDP and TCP sockets for `addr` (so a busy port fails at start-up).
pub fn bind(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let udp = UdpSocket::from_std(bind_udp(addr)?)?;
    let tcp = TcpListener::from_std(bind_tcp(addr)?)?;
    info!(%addr, "apps.internal DNS ready (UDP and TCP)");
    Ok((udp, tcp))
}

/// Answers on bound sockets until `stop` turns true.
/// Serves DNS until `stop`; TCP connections within `gate`.
pub async fn run(
    udp: UdpSocket,
    tcp: TcpListener,
    lookup: Lookup,
    gate: Arc<Gate>,
    stop: watch::Receiver<bool>,
) {
    let udp_task = {
        let (lookup, mut stop) = (lookup.clone(), stop.clone());
        async move {
            let mut buf = vec![0u8; 4096];
            loop {
                tokio::select! {
                    received = udp.recv_from(&mut buf) => {
                        let Ok((n, from)) = received else { continue };
                        if let Some(reply) = answer(&buf[..n], lookup.as_ref(), true) {
                            let _ = udp.send_to(&reply, from).await;
                        } else {
                            debug!(%from, "dropped an unparseable DNS datagram");
                        }
                    }
                    _ = stop.changed() => return,
                }
            }
        }
    };
    let tcp_task = {
        let mut stop = stop.clone();
        let mut backoff = Backoff::default();
        async move {
            loop {
                tokio::select! {
                    accepted = tcp.accept() => {
                        let Some((stream, peer)) = backoff.accepted("dns-tcp", accepted).await else { continue };
                        let Some(ticket) = gate.admit(Some(peer.ip())) else { continue };
                        let lookup = lookup.clone();
                        tokio::spawn(async move {
                            serve_tcp(stream, lookup).await;
                            drop(ticket);
                        });
                    }
                    _ = stop.changed() => return,
                }
            }
        }
    };
    tokio::join!(udp_task, tcp_task);
}

/// One TCP connection: length-prefixed messages (RFC 1035 4.2.2) until the
/// client closes or goes quiet for 10 s.
async fn serve_tcp(mut stream: tokio::net::TcpStream, lookup: Lookup) {
    let idle = Duration::from_secs(10);
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(idle, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let mut request = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if !matches!(tokio::time::timeout(idle, stream.read_exact(&mut request)).await, Ok(Ok(_))) {
            return;
        }
        let Some(reply) = answer(&request, lookup.as_ref(), false) else { return };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            warn!("DNS answer too large for TCP framing");
            return;
        };
        if stream.write_all(&reply_len.to_be_bytes()).await.is_err()
            || stream.write_all(&reply).await.is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::op::Query;

    use super::*;

    fn query(name: &str, rtype: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        m.to_vec().unwrap()
    }

    fn lookup(host: &str) -> Option<Vec<IpAddr>> {
        let v4 = |d| IpAddr::V4(Ipv4Addr::new(10, 255, 0, d));
        match host {
            "backend" => Some(vec![v4(2), v4(3)]),
            // Dual stack: one instance with both families, one IPv4 only.
            "dual" => Some(vec![v4(4), "fd00::4".parse().unwrap(), v4(5)]),
            "empty" => Some(vec![]),
            _ => None,
        }
    }

    fn ask(name: &str, rtype: RecordType) -> Message {
        Message::from_vec(&answer(&query(name, rtype), &lookup, true).unwrap()).unwrap()
    }

    #[test]
    fn answers_the_zone_and_refuses_the_rest() {
        let m = ask("backend.apps.internal.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.metadata.id, 4242);
        assert!(m.metadata.authoritative);
        assert_eq!(m.answers.len(), 2);
        assert_eq!(
            ask("BACKEND.Apps.Internal.", RecordType::A).answers.len(),
            2,
            "case-insensitive"
        );
        for (name, code) in [
            ("nope.apps.internal.", ResponseCode::NXDomain),
            ("a.backend.apps.internal.", ResponseCode::NXDomain),
            ("apps.internal.", ResponseCode::NXDomain),
            ("example.com.", ResponseCode::Refused),
        ] {
            assert_eq!(ask(name, RecordType::A).metadata.response_code, code, "{name}");
        }
        let aaaa = ask("backend.apps.internal.", RecordType::AAAA);
        assert_eq!((aaaa.metadata.response_code, aaaa.answers.len()), (ResponseCode::NoError, 0));
        let dual = ask("dual.apps.internal.", RecordType::AAAA);
        let v6: Vec<_> = dual.answers.iter().map(|r| r.data.clone()).collect();
        assert_eq!(v6, [RData::AAAA(AAAA("fd00::4".parse::<Ipv6Addr>().unwrap()))]);
        assert_eq!(ask("dual.apps.internal.", RecordType::A).answers.len(), 2);
        assert_eq!(ask("dual.apps.internal.", RecordType::ANY).answers.len(), 3);
        let empty = ask("empty.apps.internal.", RecordType::A);
        assert_eq!((empty.metadata.response_code, empty.answers.len()), (ResponseCode::NoError, 0));
    }

    #[test]
    fn garbage_gets_formerr_or_nothing() {
        assert!(answer(&[1, 2, 3], &lookup, true).is_none());
        let mut junk = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        junk.extend_from_slice(&[0xff; 30]);
        let m = Message::from_vec(&answer(&junk, &lookup, true).unwrap()).unwrap();
        assert_eq!((m.metadata.id, m.metadata.response_code), (0xabcd, ResponseCode::FormErr));
        // A response is never answered.
        let mut response = query("backend.apps.internal.", RecordType::A);
        response[2] |= 0x80;
        assert!(answer(&response, &lookup, true).is_none());
    }

    #[test]
    fn too_many_instances_for_udp_set_the_truncation_bit() {
        let many =
            |_: &str| Some((1..=100).map(|i| IpAddr::V4(Ipv4Addr::new(10, 255, 1, i))).collect());
        let udp = Message::from_vec(
            &answer(&query("x.apps.internal.", RecordType::A), &many, true).unwrap(),
        )
        .unwrap();
        assert!(udp.metadata.truncation && udp.answers.is_empty());
        let tcp = Message::from_vec(
            &answer(&query("x.apps.internal.", RecordType::A), &many, false).unwrap(),
        )
        .unwrap();
        assert_eq!(tcp.answers.len(), 100);
    }
}
