//! The policy server's client against a mutual-TLS server of the test's
//! own on loopback: requests share one connection while the server keeps
//! it; a kept connection the server closed is replaced and the request
//! answered; a new connection closed before answering is not asked again.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    sync::Arc,
    thread::JoinHandle,
};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::{
    RootCertStore, ServerConfig, ServerConnection, StreamOwned,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::WebPkiClientVerifier,
};

use super::{CfConfig, PolicyServerClient};

/// How many requests the server answers on a connection before it
/// closes it (with TLS's close_notify, as Go's server closes an idle one).
#[derive(Clone, Copy)]
struct Answers(usize);

/// A server on 127.0.0.1 that takes `connections` connections one after
/// the other, answering each as `answers` says (the body: how many
/// requests it answered so far), and a client of it.
fn serve(name: &str, connections: usize, answers: Answers) -> (PolicyServerClient, JoinHandle<()>) {
    let dir = std::env::temp_dir().join(format!("policy-agent-cf-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = Arc::new(pki(&dir));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let mut answered = 0;
        for _ in 0..connections {
            let (tcp, _) = listener.accept().unwrap();
            let tls = ServerConnection::new(config.clone()).unwrap();
            let mut stream = BufReader::new(StreamOwned::new(tls, tcp));
            for _ in 0..answers.0 {
                let mut line = String::new();
                // The request's head, to its empty line; none: the client left.
                while stream.read_line(&mut line).unwrap_or(0) > 2 {
                    line.clear();
                }
                if line.is_empty() {
                    break;
                }
                answered += 1;
                let body = answered.to_string();
                let answer =
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                stream.get_mut().write_all(answer.as_bytes()).unwrap();
            }
            let StreamOwned { conn, sock } = stream.get_mut();
            while conn.is_handshaking() {
                conn.complete_io(sock).unwrap();
            }
            conn.send_close_notify();
            let _ = conn.complete_io(sock);
        }
    });
    let config: CfConfig = serde_json::from_value(serde_json::json!({
        "policy_server_url": format!("https://127.0.0.1:{port}"),
        "ca_cert_file": dir.join("ca.pem"),
        "client_cert_file": dir.join("cell.pem"),
        "client_key_file": dir.join("cell.key"),
        "client_timeout": "5s",
    }))
    .unwrap();
    let client = PolicyServerClient::new(&config).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (client, server)
}

/// A CA, the cell's certificate (written to `dir`) and the server's
/// config: its certificate for 127.0.0.1, client certificates of the CA
/// required.
fn pki(dir: &std::path::Path) -> ServerConfig {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let issue = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()]).unwrap().signed_by(&key, &issuer);
        (cert.unwrap(), key)
    };
    let (cell, cell_key) = issue("cell-0");
    let (server, server_key) = issue("127.0.0.1");
    let write = |file: &str, pem: String| std::fs::write(dir.join(file), pem).unwrap();
    write("ca.pem", ca.pem());
    write("cell.pem", cell.pem());
    write("cell.key", cell_key.serialize_pem());
    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let chain: Vec<CertificateDer<'static>> = vec![server.der().clone()];
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier.unwrap())
        .with_single_cert(chain, key)
        .unwrap()
}

#[test]
fn requests_share_the_kept_connection() {
    let (client, server) = serve("kept", 1, Answers(usize::MAX));
    for answered in 1..=5 {
        assert_eq!(client.last_updated().unwrap(), answered);
    }
    assert_eq!(client.connections_made(), 1);
    drop(client);
    server.join().unwrap();
}

#[test]
fn a_kept_connection_the_server_closed_is_replaced() {
    let (client, server) = serve("closed", 3, Answers(1));
    for answered in 1..=3 {
        assert_eq!(client.last_updated().unwrap(), answered, "over a new connection");
    }
    assert_eq!(client.connections_made(), 3);
    server.join().unwrap();
}

#[test]
fn a_new_connection_closed_unanswered_is_not_asked_again() {
    let (client, server) = serve("unanswered", 1, Answers(0));
    let error = client.last_updated().unwrap_err();
    assert_eq!(error.kind(), "unreachable", "{error}");
    assert_eq!(client.connections_made(), 1);
    server.join().unwrap();
}
