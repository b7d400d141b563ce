//! The agent's etcd client: a blocking face over the `etcd-client` crate
//! (etcd's v3 gRPC API over tonic), for the agent's threads.
//!
//! - **TLS and authentication**: `https://` endpoints with the operator's
//!   CA, and a client certificate and key (etcd's `--client-cert-auth`,
//!   whose certificate's CN is the user etcd's role-based access checks),
//!   or a user and password. Plain `http://` only where the configuration
//!   says so explicitly (see [`crate::cluster::ClusterConfig`]).
//! - **Several members, with failover**: one gRPC connection per member,
//!   made on first use; a call goes to the member that last answered and,
//!   if that one fails (down, cut off, or without a leader: every request
//!   requires one), to the next, each within [`Settings::timeout`]. A
//!   member that failed is connected afresh the next time. A write whose
//!   answer was lost may be tried again on the next member; every write
//!   the store makes either carries a condition (a lost-and-repeated
//!   write fails its condition and reads as a concurrent one) or puts the
//!   same value twice.
//! - **Watches as streams**, and leases renewed through etcd's keepalive
//!   stream.
//!
//! The gRPC calls run on a small runtime of their own, so that any thread
//! may call, tokio's included (its `spawn_blocking` threads).
//!
//! etcd's limits shape what is asked of it: a transaction holds at most
//! 128 operations (`--max-txn-ops`) and a request at most 1.5 MiB
//! (`--max-request-bytes`), so the store writes one key per change, never
//! one per policy.
//!
//! Where it sits: the lowest of the modules that speak to etcd. It holds
//! the client and, in [`keys`], the name of every key the agents write.
//! The etcd-backed store (`store::etcd`) and cluster mode (`cluster`:
//! hosts, overlay, CAs, following) use both; nothing here knows of either.

pub mod keys;

use std::{
    fmt,
    future::Future,
    path::PathBuf,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::Duration,
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd is unreachable at {endpoints}: {reason}")]
    Unreachable { endpoints: String, reason: String },
    #[error("etcd refused the request ({code}): {message}")]
    Refused { code: String, message: String },
    #[error("etcd sent something unexpected: {0}")]
    Malformed(String),
    #[error("the watch's revision {revision} has been compacted")]
    Compacted { revision: i64 },
}

/// One key and value as etcd holds them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// A read: the keys found and the store's revision when read.
#[derive(Clone, Debug, Default)]
pub struct Range {
    pub kvs: Vec<KeyValue>,
    pub revision: i64,
}

/// A condition of a transaction: `key`'s last modification was at
/// `mod_revision` (0: the key does not exist).
#[derive(Clone, Debug)]
pub struct ModRevisionIs {
    pub key: String,
    pub mod_revision: i64,
}

/// One write of a transaction.
#[derive(Clone, Debug)]
pub enum Write {
    /// `key` = `value`, under `lease` (0: none).
    Put { key: String, value: Vec<u8>, lease: i64 },
    /// Every key from `key` up to (not including) `end`.
    DeleteRange { key: String, end: Vec<u8> },
}

/// The files a TLS connection to etcd is made with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA etcd's serving certificates are checked against.
    pub ca: PathBuf,
    /// This agent's client certificate and key, if etcd asks for one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// How to reach etcd.
#[derive(Clone, PartialEq, Eq)]
pub struct Settings {
    /// `http://HOST:PORT` or `https://HOST:PORT`, one per member.
    pub endpoints: Vec<String>,
    pub tls: Option<TlsFiles>,
    /// A user and password for etcd's role-based access.
    pub user: Option<(String, String)>,
    /// How long one member has to answer one request.
    pub timeout: Duration,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls)
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Settings {
    /// The connection options: TLS files read and checked now.
    fn options(&self) -> Result<ConnectOptions, String> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            // A member that dies or is cut off under a watch is noticed.
            .with_keep_alive(Duration::from_secs(5), self.timeout)
            .with_keep_alive_while_idle(true)
            // A member without a leader fails fast, and the next is asked.
            .with_require_leader(true);
        if let Some(tls) = &self.tls {
            let read = |path: &PathBuf, key: &str| {
                std::fs::read(path)
                    .map_err(|e| format!("cannot read {key} {}: {e}", path.display()))
            };
            let mut config = TlsOptions::new()
                .ca_certificate(Certificate::from_pem(read(&tls.ca, "etcd_ca_file")?));
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(Identity::from_pem(
                    read(cert, "etcd_cert_file")?,
                    read(key, "etcd_key_file")?,
                ));
            }
            options = options.with_tls(config);
        }
        if let Some((name, password)) = &self.user {
            options = options.with_user(name, password).with_auto_token_refresh(true);
        }
        Ok(options)
    }
}

/// A client of one etcd cluster; clones share its connections.
#[derive(Clone)]
pub struct Etcd {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    /// The connection options, or why there are none (an unreadable file).
    options: Result<ConnectOptions, String>,
    /// One client per member, connected on first use.
    members: Vec<Mutex<Option<Client>>>,
    /// The member that answered last: asked first.
    current: AtomicUsize,
    runtime: OnceLock<Runtime>,
}

impl Inner {
    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.get_or_init(Runtime::start).handle()
    }

    /// Runs `future` on this client's runtime and waits for it, from any
    /// thread but the runtime's own.
    fn block<T: Send + 'static>(&self, future: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = mpsc::sync_channel(1);
        self.runtime().spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv().expect("the etcd runtime runs every call to its end")
    }
}

impl fmt::Debug for Etcd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Etcd").field("endpoints", &self.inner.settings.endpoints).finish()
    }
}

/// The runtime a client's gRPC calls run on: one worker thread, started at
/// the client's first call, so in the network namespace of the thread that
/// made it (a test process talks to etcds in several). Shut down without
/// waiting when the client goes, which may be on its own worker.
struct Runtime(Option<tokio::runtime::Runtime>);

impl Runtime {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd")
            .enable_all()
            .build()
            .expect("the etcd client's runtime starts");
        Self(Some(runtime))
    }

    fn handle(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("the runtime runs until dropped")
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// The end of the range of keys starting with `prefix`.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The end of the range holding `key` alone (`subnets/1` is a prefix of
/// `subnets/10`: a prefix range would hold both).
pub fn key_end(key: &str) -> Vec<u8> {
    format!("{key}\0").into_bytes()
}

/// Checks `url` is `http://HOST:PORT` or `https://HOST:PORT`; returns
/// whether it is `https`.
pub fn check_endpoint(url: &str) -> Result<bool, String> {
    let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(format!("{url:?} is not https://HOST:PORT (an etcd member's client URL)"));
    };
    let rest = rest.trim_end_matches('/');
    let port = rest.rsplit_once(':').and_then(|(host, port)| {
        (!host.is_empty() && !host.contains('/')).then_some(port)?.parse::<u16>().ok()
    });
    match port {
        Some(p) if p != 0 => Ok(https),
        _ => Err(format!("{url:?} is not https://HOST:PORT (an etcd member's client URL)")),
    }
}

/// A refusal: the same on every member, so not worth asking another.
fn refusal(e: &etcd_client::Error) -> Option<EtcdError> {
    let etcd_client::Error::GRpcStatus(status) = e else { return None };
    let refused = matches!(
        status.code(),
        Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::ResourceExhausted
            | Code::NotFound
            | Code::AlreadyExists
    );
    refused.then(|| EtcdError::Refused {
        code: format!("{:?}", status.code()),
        message: status.message().to_owned(),
    })
}

fn failure(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            format!("{:?}: {}", status.code(), status.message())
        }
        other => other.to_string(),
    }
}

impl Etcd {
    /// A client of the members at `endpoints` (`http://HOST:PORT`), in
    /// plain text: for tests and for callers that checked the choice.
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<Self, String> {
        Self::with_settings(Settings {
            endpoints: endpoints.to_vec(),
            tls: None,
            user: None,
            timeout,
        })
    }

    /// A client with `settings`; nothing is connected until the first call.
    pub fn with_settings(settings: Settings) -> Result<Self, String> {
        if settings.endpoints.is_empty() {
            return Err("no etcd endpoints".into());
        }
        for url in &settings.endpoints {
            let https = check_endpoint(url)?;
            if https && settings.tls.is_none() {
                return Err(format!("{url:?} is https: etcd_ca_file must name etcd's CA"));
            }
        }
        let options = settings.options();
        let members = settings.endpoints.iter().map(|_| Mutex::new(None)).collect();
        Ok(Self {
            inner: Arc::new(Inner {
                settings,
                options,
                members,
                current: AtomicUsize::new(0),
                runtime: OnceLock::new(),
            }),
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.inner.settings.endpoints
    }

    fn unreachable(&self, reason: String) -> EtcdError {
        EtcdError::Unreachable { endpoints: self.inner.settings.endpoints.join(", "), reason }
    }

    /// Member `index`'s client, connected now if need be.
    async fn member(inner: &Inner, index: usize) -> Result<Client, String> {
        if let Some(client) = inner.members[index].lock().expect("etcd members").clone() {
            return Ok(client);
        }
        let options = inner.options.clone()?;
        let url = &inner.settings.endpoints[index];
        // Connecting is lazy but for the authentication of a user.
        let client = tokio::time::timeout(
            inner.settings.timeout,
            Client::connect([url.as_str()], Some(options)),
        )
        .await
        .map_err(|_| format!("{url}: no answer within {:?}", inner.settings.timeout))?
        .map_err(|e| format!("{url}: {}", failure(&e)))?;
        *inner.members[index].lock().expect("etcd members") = Some(client.clone());
        Ok(client)
    }

    /// Runs `op` against the members in turn, starting with the one that
    /// answered last, until one answers or refuses.
    fn call<T, F, Fut>(&self, op: F) -> Result<T, EtcdError>
    where
        T: Send + 'static,
        F: Fn(Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send,
    {
        let inner = self.inner.clone();
        let outcome = self.inner.block(async move {
            let count = inner.members.len();
            let first = inner.current.load(Ordering::Relaxed);
            let mut reasons = Vec::new();
            for i in 0..count {
                let index = (first + i) % count;
                let client = match Self::member(&inner, index).await {
                    Ok(client) => client,
                    Err(reason) => {
                        reasons.push(reason);
                        continue;
                    }
                };
                let url = &inner.settings.endpoints[index];
                match tokio::time::timeout(inner.settings.timeout, op(client)).await {
                    Ok(Ok(answer)) => {
                        inner.current.store(index, Ordering::Relaxed);
                        return Ok(answer);
                    }
                    Ok(Err(e)) => {
                        if let Some(refused) = refusal(&e) {
                            return Err(Ok(refused));
                        }
                        reasons.push(format!("{url}: {}", failure(&e)));
                    }
                    Err(_) => {
                        reasons
                            .push(format!("{url}: no answer within {:?}", inner.settings.timeout));
                    }
                }
                // Connected afresh next time.
                *inner.members[index].lock().expect("etcd members") = None;
            }
            Err(Err(reasons.join("; ")))
        });
        outcome.map_err(|e| e.unwrap_or_else(|reason| self.unreachable(reason)))
    }

    /// Keys from `key` up to (not including) `end`.
    pub fn range(&self, key: &str, end: &[u8]) -> Result<Range, EtcdError> {
        let (key, end) = (key.to_owned(), end.to_vec());
        let response = self.call(move |mut client| {
            let (key, end) = (key.clone(), end.clone());
            async move { client.get(key, Some(GetOptions::new().with_range(end))).await }
        })?;
        let kvs = response
            .kvs()
            .iter()
            .map(|kv| {
                Ok(KeyValue {
                    key: kv
                        .key_str()
                        .map_err(|_| EtcdError::Malformed("a key is not UTF-8".into()))?
                        .to_owned(),
                    value: kv.value().to_vec(),
                    mod_revision: kv.mod_revision(),
                })
            })
            .collect::<Result<_, EtcdError>>()?;
        Ok(Range { kvs, revision: response.header().map_or(0, |h| h.revision()) })
    }

    /// The keys (no values) from `key` up to `end`.
    pub fn keys(&self, key: &str, end: &[u8]) -> Result<Vec<String>, EtcdError> {
        let (key, end) = (key.to_owned(), end.to_vec());
        let response = self.call(move |mut client| {
            let (key, end) = (key.clone(), end.clone());
            async move {
                client.get(key, Some(GetOptions::new().with_range(end).with_keys_only())).await
            }
        })?;
        response
            .kvs()
            .iter()
            .map(|kv| {
                kv.key_str()
                    .map(str::to_owned)
                    .map_err(|_| EtcdError::Malformed("a key is not UTF-8".into()))
            })
            .collect()
    }

    /// Deletes the keys from `key` up to (not including) `end`.
    pub fn delete_range(&self, key: &str, end: &[u8]) -> Result<(), EtcdError> {
        let (key, end) = (key.to_owned(), end.to_vec());
        self.call(move |mut client| {
            let (key, end) = (key.clone(), end.clone());
            async move { client.delete(key, Some(DeleteOptions::new().with_range(end))).await }
        })?;
        Ok(())
    }

    /// Writes `puts` (key, value, lease or 0) if every condition holds, all
    /// in one transaction. Returns whether it did, and the revision after.
    pub fn put_if(
        &self,
        conditions: &[ModRevisionIs],
        puts: &[(&str, &[u8], i64)],
    ) -> Result<(bool, i64), EtcdError> {
        let writes: Vec<Write> = puts
            .iter()
            .map(|(key, value, lease)| Write::Put {
                key: (*key).to_owned(),
                value: value.to_vec(),
                lease: *lease,
            })
            .collect();
        self.write_if(conditions, writes)
    }

    /// Makes `writes` if every condition holds, all in one transaction (no
    /// put may fall in a deleted range: etcd refuses such a transaction).
    /// Returns whether it did, and the revision after.
    pub fn write_if(
        &self,
        conditions: &[ModRevisionIs],
        writes: Vec<Write>,
    ) -> Result<(bool, i64), EtcdError> {
        let compares = compares(conditions);
        self.txn(move || {
            let operations = writes
                .iter()
                .map(|write| match write {
                    Write::Put { key, value, lease } => {
                        let options = (*lease != 0).then(|| PutOptions::new().with_lease(*lease));
                        TxnOp::put(key.clone(), value.clone(), options)
                    }
                    Write::DeleteRange { key, end } => TxnOp::delete(
                        key.clone(),
                        Some(DeleteOptions::new().with_range(end.clone())),
                    ),
                })
                .collect::<Vec<_>>();
            Txn::new().when(compares.clone()).and_then(operations)
        })
    }

    /// Deletes `key` if every condition holds. Returns whether it did.
    pub fn delete_if(&self, conditions: &[ModRevisionIs], key: &str) -> Result<bool, EtcdError> {
        let compares = compares(conditions);
        let key = key.to_owned();
        let (done, _) = self.txn(move || {
            Txn::new().when(compares.clone()).and_then(vec![TxnOp::delete(key.clone(), None)])
        })?;
        Ok(done)
    }

    fn txn(&self, make: impl Fn() -> Txn + Send + 'static) -> Result<(bool, i64), EtcdError> {
        let response = self.call(move |mut client| {
            let txn = make();
            async move { client.txn(txn).await }
        })?;
        Ok((response.succeeded(), response.header().map_or(0, |h| h.revision())))
    }

    /// A lease of `ttl` seconds; keys put with it go when it expires.
    pub fn grant_lease(&self, ttl: i64) -> Result<i64, EtcdError> {
        let response =
            self.call(move |mut client| async move { client.lease_grant(ttl, None).await })?;
        match response.id() {
            0 => Err(EtcdError::Malformed("no lease id in the answer".into())),
            id => Ok(id),
        }
    }

    /// Renews a lease; false if it has expired (its keys are gone).
    pub fn keep_alive(&self, lease: i64) -> Result<bool, EtcdError> {
        let answer = self.call(move |mut client| async move {
            let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            stream.message().await
        })?;
        let answer = answer.ok_or_else(|| EtcdError::Malformed("no keepalive answer".into()))?;
        Ok(answer.ttl() > 0)
    }

    /// Watches the keys from `key` to `end` from `revision` on, calling
    /// `on_event` with the header revision of each batch of changes until
    /// it returns false or the stream ends. A compacted start revision is
    /// [`EtcdError::Compacted`]; a stream that breaks (its member gone or
    /// without a leader) is [`EtcdError::Unreachable`]: watch again.
    pub fn watch(
        &self,
        key: &str,
        end: &[u8],
        revision: i64,
        mut on_event: impl FnMut(i64) -> bool,
    ) -> Result<(), EtcdError> {
        enum Message {
            Events(i64),
            Compacted(i64),
            Ended(Option<String>),
        }
        let (key, end) = (key.to_owned(), end.to_vec());
        // The stream is opened like any call (the first member to answer),
        // then read on the runtime and handed over message by message.
        let mut stream = self.call(move |mut client| {
            let options = WatchOptions::new().with_range(end.clone()).with_start_revision(revision);
            let key = key.clone();
            async move { client.watch(key, Some(options)).await }
        })?;
        // Unbounded: the runtime's one worker must never wait for
        // `on_event`, which may itself call etcd.
        let (tx, rx) = mpsc::channel();
        self.inner.runtime().spawn(async move {
            loop {
                let message = match stream.message().await {
                    Ok(Some(response)) if response.compact_revision() != 0 => {
                        Message::Compacted(response.compact_revision())
                    }
                    Ok(Some(response)) if response.canceled() => {
                        Message::Ended(Some(format!("canceled: {}", response.cancel_reason())))
                    }
                    Ok(Some(response)) if response.events().is_empty() => continue,
                    Ok(Some(response)) => {
                        Message::Events(response.header().map_or(0, |h| h.revision()))
                    }
                    Ok(None) => Message::Ended(None),
                    Err(e) => Message::Ended(Some(failure(&e))),
                };
                let last = !matches!(message, Message::Events(_));
                if tx.send(message).is_err() || last {
                    return; // Dropping the stream cancels the watch.
                }
            }
        });
        for message in rx {
            match message {
                Message::Events(revision) => {
                    if !on_event(revision) {
                        return Ok(());
                    }
                }
                Message::Compacted(revision) => return Err(EtcdError::Compacted { revision }),
                Message::Ended(None) => return Ok(()),
                Message::Ended(Some(reason)) => {
                    return Err(self.unreachable(format!("the watch broke: {reason}")));
                }
            }
        }
        Ok(())
    }
}

/// A transaction's conditions.
fn compares(conditions: &[ModRevisionIs]) -> Vec<Compare> {
    conditions
        .iter()
        .map(|c| Compare::mod_revision(c.key.clone(), CompareOp::Equal, c.mod_revision))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_cover_the_prefix_only() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("ab\u{7f}"), b"ab\x80".to_vec());
    }

    #[test]
    fn endpoints_are_client_urls() {
        let timeout = Duration::from_secs(1);
        assert!(Etcd::new(&["http://127.0.0.1:2379".into()], timeout).is_ok());
        assert!(Etcd::new(&["http://etcd-0.internal:2379/".into()], timeout).is_ok());
        for bad in
            ["etcd.example:2379", "http://127.0.0.1", "http://:2379", "ftp://a:1", "http://a:0"]
        {
            assert!(Etcd::new(&[bad.into()], timeout).is_err(), "{bad}");
        }
        assert!(Etcd::new(&[], timeout).is_err());
        // https needs the CA that etcd's certificates are checked against.
        let err = Etcd::new(&["https://10.0.0.1:2379".into()], timeout).unwrap_err();
        assert!(err.contains("etcd_ca_file"), "{err}");
    }

    #[test]
    fn an_unreadable_tls_file_is_named_at_every_call() {
        let etcd = Etcd::with_settings(Settings {
            endpoints: vec!["https://127.0.0.1:1".into()],
            tls: Some(TlsFiles { ca: "/nonexistent/ca.pem".into(), identity: None }),
            user: None,
            timeout: Duration::from_millis(200),
        })
        .unwrap();
        let err = etcd.range("/a", b"/b").unwrap_err().to_string();
        assert!(err.contains("etcd_ca_file /nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn a_member_that_does_not_answer_is_unreachable_not_hung() {
        // A listener that accepts and never speaks: the call times out.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let etcd = Etcd::new(&[url], Duration::from_millis(300)).unwrap();
        let err = etcd.range("/a", b"/b").unwrap_err();
        assert!(matches!(err, EtcdError::Unreachable { .. }), "{err}");
    }
}
