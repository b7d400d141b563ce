//! UAA's `check_token`, as Cloud Foundry's own integration tests stand it
//! in: a loopback HTTP server in the test process that finds
//! [`TOKEN`](super::TOKEN) admin with `network.admin` and refuses any other
//! token. The policy server reaches it over plain HTTP (its `uaa_url` says
//! the scheme).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use super::{TOKEN, network::Network};

pub(super) struct UaaStandIn {
    pub(super) port: u16,
    /// The accept loop's listening socket (a second handle to it), to wake
    /// that loop on drop.
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UaaStandIn {
    /// Listens on `network`'s loopback, where the policy server runs; the
    /// accept loop itself may run anywhere (a socket keeps its namespace).
    pub(super) fn start(network: &Network) -> Self {
        let listener =
            network.run(|| TcpListener::bind("127.0.0.1:0")).expect("UAA stand-in listener");
        let port = listener.local_addr().expect("UAA stand-in address").port();
        let accepting = listener.try_clone().expect("UAA stand-in listener handle");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            for stream in accepting.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(stream) = stream {
                    let _ = answer_check_token(stream);
                }
            }
        });
        Self { port, listener, stop, thread: Some(thread) }
    }
}

impl Drop for UaaStandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop, which then sees `stop`: shutting a
        // listening socket down closes it for accept (inet_shutdown in
        // net/ipv4/af_inet.c disconnects a TCP_LISTEN socket; a blocked
        // accept returns EINVAL). Unlike a wake-up connect, this needs no
        // way back into the listener's namespace, which a test may have
        // deleted already.
        // SAFETY: shutdown has no memory preconditions; the descriptor is
        // this struct's own, open until it drops.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RD) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One request, one answer, then the connection closes.
fn answer_check_token(stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut length = 0;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let body = String::from_utf8_lossy(&body);
    let (status, answer) = if !request_line.starts_with("POST /check_token ") {
        ("404 Not Found", r#"{"error":"not_found"}"#)
    } else if body.split('&').any(|field| field == format!("token={TOKEN}")) {
        ("200 OK", r#"{"scope":["network.admin"],"user_name":"admin","client_id":"cf"}"#)
    } else {
        ("400 Bad Request", r#"{"error":"invalid_token"}"#)
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{answer}",
        answer.len()
    )?;
    stream.flush()
}
