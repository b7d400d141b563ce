//! A small blocking client for etcd's v3 JSON gateway (`/v3/kv/range`,
//! `/v3/kv/txn`, `/v3/watch`, `/v3/lease/*`), over plain HTTP/1.1: keys
//! and values travel base64-encoded, 64-bit numbers as strings. Every
//! request tries the endpoints in turn until one answers.
//!
//! etcd's limits shape what is asked of it: a transaction holds at most
//! 128 operations (`--max-txn-ops`) and a request at most 1.5 MiB
//! (`--max-request-bytes`), so the store writes one key per change, never
//! one per policy.

use std::{
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde_json::{Value, json};

use crate::client::{self, ClientError, Response};

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd is unreachable at {endpoints}: {reason}")]
    Unreachable { endpoints: String, reason: String },
    #[error("etcd answered HTTP {status}: {message}")]
    Refused { status: u16, message: String },
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

#[derive(Clone, Debug)]
pub struct Etcd {
    endpoints: Vec<SocketAddr>,
    timeout: Duration,
}

fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

fn unb64(text: &str) -> Result<Vec<u8>, EtcdError> {
    STANDARD.decode(text).map_err(|e| EtcdError::Malformed(format!("base64: {e}")))
}

/// etcd's JSON gateway writes int64 as strings, and omits zero values.
fn int(value: &Value) -> i64 {
    match value {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// A transaction's conditions in the gateway's JSON.
fn compares(conditions: &[ModRevisionIs]) -> Vec<Value> {
    conditions
        .iter()
        .map(|c| {
            json!({"key": b64(c.key.as_bytes()), "target": "MOD", "result": "EQUAL",
                   "mod_revision": c.mod_revision.to_string()})
        })
        .collect()
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

fn key_values(kvs: &Value) -> Result<Vec<KeyValue>, EtcdError> {
    kvs.as_array()
        .into_iter()
        .flatten()
        .map(|kv| {
            let key = unb64(kv["key"].as_str().unwrap_or_default())?;
            Ok(KeyValue {
                key: String::from_utf8(key)
                    .map_err(|_| EtcdError::Malformed("a key is not UTF-8".into()))?,
                value: unb64(kv["value"].as_str().unwrap_or_default())?,
                mod_revision: int(&kv["mod_revision"]),
            })
        })
        .collect()
}

impl Etcd {
    /// A client of the etcd members at `endpoints` (`http://HOST:PORT`).
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<Self, String> {
        let endpoints = endpoints
            .iter()
            .map(|url| {
                let addr = url.strip_prefix("http://").unwrap_or(url).trim_end_matches('/');
                addr.parse::<SocketAddr>().map_err(|_| {
                    format!("{url:?} is not http://ADDRESS:PORT (etcd's client URL, by IP address)")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err("no etcd endpoints".into());
        }
        Ok(Self { endpoints, timeout })
    }

    fn endpoints_text(&self) -> String {
        self.endpoints.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    }

    fn connect(&self) -> Result<TcpStream, EtcdError> {
        let mut last = String::new();
        for addr in &self.endpoints {
            match TcpStream::connect_timeout(addr, self.timeout) {
                Ok(stream) => return Ok(stream),
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(EtcdError::Unreachable { endpoints: self.endpoints_text(), reason: last })
    }

    fn unreachable(&self, e: ClientError) -> EtcdError {
        EtcdError::Unreachable { endpoints: self.endpoints_text(), reason: e.to_string() }
    }

    /// A unary call: `POST /v3/PATH` with `body`.
    fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let stream = self.connect()?;
        stream.set_read_timeout(Some(self.timeout)).map_err(|e| self.unreachable(e.into()))?;
        stream.set_write_timeout(Some(self.timeout)).map_err(|e| self.unreachable(e.into()))?;
        let Response { status, body } =
            client::exchange(stream, "etcd", "POST", &format!("/v3/{path}"), Some(body))
                .map_err(|e| self.unreachable(e))?;
        if !(200..300).contains(&status) {
            let message = body["message"].as_str().or(body["error"].as_str()).unwrap_or("");
            return Err(EtcdError::Refused { status, message: message.to_owned() });
        }
        Ok(body)
    }

    /// Keys from `key` up to (not including) `end`.
    pub fn range(&self, key: &str, end: &[u8]) -> Result<Range, EtcdError> {
        let body =
            self.call("kv/range", &json!({"key": b64(key.as_bytes()), "range_end": b64(end)}))?;
        Ok(Range { kvs: key_values(&body["kvs"])?, revision: int(&body["header"]["revision"]) })
    }

    /// The keys (no values) from `key` up to `end`.
    pub fn keys(&self, key: &str, end: &[u8]) -> Result<Vec<String>, EtcdError> {
        let body = self.call(
            "kv/range",
            &json!({"key": b64(key.as_bytes()), "range_end": b64(end), "keys_only": true}),
        )?;
        Ok(key_values(&body["kvs"])?.into_iter().map(|kv| kv.key).collect())
    }

    /// Deletes the keys from `key` up to (not including) `end`.
    pub fn delete_range(&self, key: &str, end: &[u8]) -> Result<(), EtcdError> {
        self.call("kv/deleterange", &json!({"key": b64(key.as_bytes()), "range_end": b64(end)}))?;
        Ok(())
    }

    /// Writes `puts` (key, value, lease or 0) if every condition holds, all
    /// in one transaction. Returns whether it did, and the revision after.
    pub fn put_if(
        &self,
        conditions: &[ModRevisionIs],
        puts: &[(&str, &[u8], i64)],
    ) -> Result<(bool, i64), EtcdError> {
        let compare = compares(conditions);
        let success: Vec<Value> = puts
            .iter()
            .map(|(key, value, lease)| {
                let mut put = json!({"key": b64(key.as_bytes()), "value": b64(value)});
                if *lease != 0 {
                    put["lease"] = json!(lease.to_string());
                }
                json!({"request_put": put})
            })
            .collect();
        let body = self.call("kv/txn", &json!({"compare": compare, "success": success}))?;
        Ok((body["succeeded"].as_bool().unwrap_or(false), int(&body["header"]["revision"])))
    }

    /// Deletes `key` if every condition holds. Returns whether it did.
    pub fn delete_if(&self, conditions: &[ModRevisionIs], key: &str) -> Result<bool, EtcdError> {
        let compare = compares(conditions);
        let delete = json!({"request_delete_range": {"key": b64(key.as_bytes())}});
        let body = self.call("kv/txn", &json!({"compare": compare, "success": [delete]}))?;
        Ok(body["succeeded"].as_bool().unwrap_or(false))
    }

    /// A lease of `ttl` seconds; keys put with it go when it expires.
    pub fn grant_lease(&self, ttl: i64) -> Result<i64, EtcdError> {
        let body = self.call("lease/grant", &json!({"TTL": ttl.to_string()}))?;
        match int(&body["ID"]) {
            0 => Err(EtcdError::Malformed(format!("no lease id in {body}"))),
            id => Ok(id),
        }
    }

    /// Renews a lease; false if it has expired (its keys are gone).
    pub fn keep_alive(&self, lease: i64) -> Result<bool, EtcdError> {
        // The gateway streams keepalive responses; the first one is enough.
        let mut first = None;
        self.stream("lease/keepalive", &json!({"ID": lease.to_string()}), |v| {
            first = Some(v);
            false
        })?;
        let result = first.ok_or_else(|| EtcdError::Malformed("no keepalive answer".into()))?;
        Ok(int(&result["result"]["TTL"]) > 0)
    }

    /// Watches the keys from `key` to `end` from `revision` on, calling
    /// `on_event` with the header revision of each batch of changes until
    /// it returns false or the stream ends. A compacted start revision is
    /// [`EtcdError::Compacted`].
    pub fn watch(
        &self,
        key: &str,
        end: &[u8],
        revision: i64,
        mut on_event: impl FnMut(i64) -> bool,
    ) -> Result<(), EtcdError> {
        let request = json!({"create_request": {"key": b64(key.as_bytes()), "range_end": b64(end),
                                                "start_revision": revision.to_string()}});
        let mut outcome = Ok(());
        self.stream("watch", &request, |message| {
            let result = &message["result"];
            let compacted = int(&result["compact_revision"]);
            if compacted != 0 {
                outcome = Err(EtcdError::Compacted { revision: compacted });
                return false;
            }
            if result["events"].as_array().is_some_and(|e| !e.is_empty()) {
                return on_event(int(&result["header"]["revision"]));
            }
            result["canceled"].as_bool() != Some(true)
        })?;
        outcome
    }

    /// A streaming call: `on_message` gets each JSON line until it returns
    /// false or the server ends the stream. The read timeout does not apply:
    /// a watch waits as long as nothing changes.
    fn stream(
        &self,
        path: &str,
        body: &Value,
        mut on_message: impl FnMut(Value) -> bool,
    ) -> Result<(), EtcdError> {
        let stream = self.connect()?;
        let mut malformed = None;
        let status = client::stream_lines(
            stream,
            "etcd",
            "POST",
            &format!("/v3/{path}"),
            Some(body),
            |line| {
                if line.trim().is_empty() {
                    return true;
                }
                match serde_json::from_str::<Value>(line) {
                    Ok(v) => on_message(v),
                    Err(e) => {
                        malformed = Some(format!("{e}: {line}"));
                        false
                    }
                }
            },
        )
        .map_err(|e| self.unreachable(e))?;
        if let Some(m) = malformed {
            return Err(EtcdError::Malformed(m));
        }
        if !(200..300).contains(&status) {
            return Err(EtcdError::Refused { status, message: format!("{path} stream") });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_cover_the_prefix_only() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("ab\u{7f}"), b"ab\x80".to_vec());
        assert!(Etcd::new(&["http://127.0.0.1:2379".into()], Duration::from_secs(1)).is_ok());
        assert!(Etcd::new(&["etcd.example:2379".into()], Duration::from_secs(1)).is_err());
        assert!(Etcd::new(&[], Duration::from_secs(1)).is_err());
    }
}
