//! Real TCP and UDP traffic between namespaces, with bounded waits.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::NetNs;

pub const SHORT: Duration = Duration::from_millis(400);
pub const LONG: Duration = Duration::from_secs(3);

/// A TCP echo server in a namespace: echoes every connection until the
/// peer closes. Runs until the process ends (its namespace going away closes
/// nothing, but tests are short).
pub fn tcp_echo_server(ns: &NetNs, ip: impl Into<IpAddr>, port: u16) -> JoinHandle<()> {
    let ip = ip.into();
    let listener = ns.run(move || TcpListener::bind((ip, port))).expect("bind echo server");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    })
}

/// A UDP echo server in a namespace.
pub fn udp_echo_server(ns: &NetNs, ip: impl Into<IpAddr>, port: u16) -> JoinHandle<()> {
    let ip = ip.into();
    let socket = ns.run(move || UdpSocket::bind((ip, port))).expect("bind udp echo");
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    })
}

/// Connects from `ns` (optionally from a given source address) with a
/// timeout.
pub fn tcp_connect(
    ns: &NetNs,
    from: Option<Ipv4Addr>,
    to: impl Into<IpAddr>,
    port: u16,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let to = to.into();
    ns.run(move || {
        let target = SocketAddr::new(to, port);
        let stream = match from {
            None => TcpStream::connect_timeout(&target, timeout)?,
            Some(src) => {
                let socket = socket2_tcp_bound(src)?;
                connect_with_timeout(socket, target, timeout)?
            }
        };
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(stream)
    })
}

/// Whether a TCP connection from `ns` to `to:port` gets established and
/// echoes a message within `timeout`.
pub fn tcp_echo_works(ns: &NetNs, to: impl Into<IpAddr>, port: u16, timeout: Duration) -> bool {
    match tcp_connect(ns, None, to, port, timeout) {
        Ok(mut stream) => echo_once(&mut stream),
        Err(_) => false,
    }
}

/// Sends a message on an open stream and reads it back.
pub fn echo_once(stream: &mut TcpStream) -> bool {
    let msg = b"policy-dataplane";
    let mut buf = [0u8; 16];
    stream.write_all(msg).is_ok() && stream.read_exact(&mut buf).is_ok() && &buf == msg
}

/// A UDP socket in `ns` bound to `from` (or any address).
pub fn udp_socket(ns: &NetNs, from: Option<Ipv4Addr>) -> UdpSocket {
    let bind = from.unwrap_or(Ipv4Addr::UNSPECIFIED);
    let socket = ns.run(move || UdpSocket::bind((bind, 0))).expect("bind udp client");
    socket.set_read_timeout(Some(SHORT)).expect("timeout");
    socket
}

/// Whether a UDP datagram of `size` bytes from `ns` to an echo server at
/// `to:port` comes back within `timeout`.
pub fn udp_echo_works(
    socket: &UdpSocket,
    to: Ipv4Addr,
    port: u16,
    size: usize,
    timeout: Duration,
) -> bool {
    socket.set_read_timeout(Some(timeout)).expect("timeout");
    let msg: Vec<u8> = (0..size).map(|i| i as u8).collect();
    if socket.send_to(&msg, (to, port)).is_err() {
        return false;
    }
    let mut buf = vec![0u8; size + 1];
    matches!(socket.recv_from(&mut buf), Ok((n, _)) if n == size && buf[..n] == msg[..])
}

fn socket2_tcp_bound(src: Ipv4Addr) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain socket(2) call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2).
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(src.octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: addr is a valid sockaddr_in of the size passed.
    let ret = unsafe {
        libc::bind(
            fd,
            &addr as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(owned)
}

/// connect(2) with a timeout on a bound socket (non-blocking connect + poll).
fn connect_with_timeout(
    fd: std::os::fd::OwnedFd,
    target: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    use std::os::fd::AsRawFd as _;
    let SocketAddr::V4(v4) = target else { unreachable!("IPv4 only") };
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on a valid fd.
    unsafe { libc::fcntl(raw, libc::F_SETFL, libc::O_NONBLOCK) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: as in bind above.
    let ret = unsafe {
        libc::connect(
            raw,
            &addr as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if ret != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(err);
        }
        let mut pfd = libc::pollfd { fd: raw, events: libc::POLLOUT, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if n <= 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"));
        }
        let mut so_error: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as u32;
        // SAFETY: valid out-pointers for SO_ERROR.
        unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                &mut so_error as *mut _ as *mut _,
                &mut len,
            )
        };
        if so_error != 0 {
            return Err(std::io::Error::from_raw_os_error(so_error));
        }
    }
    // SAFETY: back to blocking mode on a valid fd.
    unsafe { libc::fcntl(raw, libc::F_SETFL, 0) };
    Ok(TcpStream::from(fd))
}

/// Two steady UDP flows from one namespace to one address: one to a port a
/// policy allows, one to a port none does. Counts what is sent and what
/// arrives, for checks that a change to the agent neither loses an allowed
/// packet nor lets a denied one through.
pub struct SteadyFlows {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sender: JoinHandle<u64>,
    allowed: JoinHandle<u64>,
    denied: JoinHandle<u64>,
}

/// What [`SteadyFlows::finish`] counted.
#[derive(Debug)]
pub struct FlowCounts {
    /// Datagrams sent on each flow.
    pub sent: u64,
    pub allowed_received: u64,
    pub denied_received: u64,
}

impl SteadyFlows {
    /// Sends one datagram per flow every 500 µs from `from` to
    /// `to:allowed_port` and `to:denied_port`, received in `to_ns`.
    pub fn start(
        from: &NetNs,
        to_ns: &NetNs,
        to: Ipv4Addr,
        allowed_port: u16,
        denied_port: u16,
    ) -> Self {
        use std::sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        };
        let stop = Arc::new(AtomicBool::new(false));
        let receive = |port: u16| {
            let socket = to_ns.run(move || UdpSocket::bind((to, port))).expect("bind receiver");
            socket.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
            // Room for seconds of datagrams: a receiver thread starved on a
            // busy machine must not turn into "lost" packets the dataplane
            // delivered (the default buffer holds ~100 ms of them).
            receive_buffer(&socket, 8 << 20);
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut received, mut buf) = (0u64, [0u8; 64]);
                while !stop.load(Ordering::Relaxed) {
                    received += u64::from(socket.recv(&mut buf).is_ok());
                }
                // What is still in flight.
                while socket.recv(&mut buf).is_ok() {
                    received += 1;
                }
                received
            })
        };
        let (allowed, denied) = (receive(allowed_port), receive(denied_port));
        let socket = from.run(|| UdpSocket::bind(("0.0.0.0", 0))).expect("bind sender");
        let sender = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    socket.send_to(b"allowed", (to, allowed_port)).expect("send");
                    socket.send_to(b"denied", (to, denied_port)).expect("send");
                    sent += 1;
                    std::thread::sleep(Duration::from_micros(500));
                }
                sent
            })
        };
        Self { stop, sender, allowed, denied }
    }

    pub fn finish(self) -> FlowCounts {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = self.sender.join().expect("sender");
        FlowCounts {
            sent,
            allowed_received: self.allowed.join().expect("receiver"),
            denied_received: self.denied.join().expect("receiver"),
        }
    }
}

/// Asks for a receive buffer of `bytes` (`SO_RCVBUFFORCE`, as root; the
/// kernel doubles it for its bookkeeping).
fn receive_buffer(socket: &UdpSocket, bytes: libc::c_int) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: a valid socket descriptor and a c_int option value of its size.
    let done = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&bytes).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(done, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
}

/// `curl URL` over HTTPS from `ns`, trusting the CA bundle `cacert`, with
/// `extra` arguments (e.g. `--cert`, `--key`): whether it succeeded, and
/// what it printed (body and errors).
pub fn curl_https(ns: &NetNs, cacert: &str, url: &str, extra: &[&str]) -> (bool, String) {
    let out = ns
        .command("curl")
        .args(["-sS", "--max-time", "3", "--cacert", cacert])
        .args(extra)
        .arg(url)
        .output()
        .expect("run curl");
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

/// A minimal HTTP/1.1 server with keep-alive: every request gets `200 OK`
/// and `body`.
pub fn http_server(
    ns: &NetNs,
    ip: impl Into<IpAddr>,
    port: u16,
    body: &'static str,
) -> JoinHandle<()> {
    serve_http(ns, ip.into(), port, move |_| body.to_owned())
}

/// An HTTP/1.1 server at `ip:port` in `ns` whose reply body is the request
/// head it received (request line and headers), for checking what a proxy
/// forwarded.
pub fn http_echo_server(ns: &NetNs, ip: Ipv4Addr, port: u16) -> JoinHandle<()> {
    serve_http(ns, IpAddr::V4(ip), port, |head| String::from_utf8_lossy(head).into_owned())
}

fn serve_http(
    ns: &NetNs,
    ip: IpAddr,
    port: u16,
    respond: impl Fn(&[u8]) -> String + Send + Sync + Copy + 'static,
) -> JoinHandle<()> {
    let listener = ns.run(move || TcpListener::bind((ip, port))).expect("bind http server");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                    while let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = request.drain(..end + 4).collect();
                        let body = respond(&head);
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if stream.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    })
}

/// Whether `ping -c 1` from `ns` to `to` (either family) gets an answer
/// within a second.
pub fn ping(ns: &NetNs, to: impl Into<IpAddr>) -> bool {
    let to = to.into();
    let family = if to.is_ipv6() { "-6" } else { "-4" };
    ns.command("ping")
        .args([family, "-c", "1", "-W", "1", &to.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}
