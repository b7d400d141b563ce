//! The dataplane's error: loading, attaching, pinning and writing maps
//! (a module of its own, below `dataplane` and the reconciler that both use it).

use std::{io, path::PathBuf};

use policy_common::ports::PortsError;

/// What can go wrong loading, attaching or writing the dataplane.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("failed to mount bpffs at {path}: {source} - are we root with CAP_SYS_ADMIN?")]
    MountBpffs { path: PathBuf, source: io::Error },
    #[error("pin directory {path} is not on a bpf filesystem (mount -t bpf bpf DIR)")]
    NotBpffs { path: PathBuf },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("failed to load the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("failed to load program {name} into the kernel: {source}")]
    LoadProgram { name: &'static str, source: Box<aya::programs::ProgramError> },
    #[error("interface {ifname} not found in this network namespace")]
    NoInterface { ifname: String },
    #[error("failed to attach {program} to {target}: {source}")]
    Attach {
        program: &'static str,
        target: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: Box<aya::maps::MapError> },
    #[error("map {name} is full ({capacity} entries); raise its capacity")]
    MapFull { name: &'static str, capacity: u32 },
    #[error(transparent)]
    Ports(#[from] PortsError),
}

impl DataplaneError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> DataplaneError {
        let path = path.into();
        move |source| DataplaneError::Io { what, path, source }
    }
}
