//! CNI errors: a code from the spec (or 100+ for this plugin), a message
//! naming the problem, and details; printed as the spec's error JSON.

use serde_json::{Value, json};

/// The spec's well-known codes.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// No address left in this host's subnet.
    pub const NO_ADDRESS: u32 = 100;
    /// The agent refused the registration (e.g. a bad app id).
    pub const AGENT_REFUSED: u32 = 101;
    /// CHECK found the container not as ADD left it.
    pub const CHECK_FAILED: u32 = 102;
    /// The host-side veth's name is held by another container (or is not
    /// a veth): ADD never takes it over.
    pub const VETH_HELD: u32 = 103;
}

#[derive(Debug)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self { code, msg: msg.into(), details: String::new() }
    }

    pub fn details(mut self, details: impl std::fmt::Display) -> Self {
        self.details = details.to_string();
        self
    }

    pub fn io(msg: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Self::new(code::IO_FAILURE, msg).details(e)
    }

    pub fn json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

pub type Result<T> = std::result::Result<T, CniError>;
