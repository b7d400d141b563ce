//! Network namespaces named by path (an endpoint's `--netns`): opened
//! without blocking and checked to be a network namespace before anything
//! is done in them, so a FIFO, a device or a plain file given as `--netns`
//! is an error, never a hang.

use std::{
    fs::File,
    os::{
        fd::AsRawFd as _,
        unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

/// Why a path cannot be used as a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot statfs {}: {source}", path.display())]
    Statfs { path: PathBuf, source: std::io::Error },
    #[error("{} is {what}, not a network namespace", path.display())]
    NotNetns { path: PathBuf, what: &'static str },
}

/// `statfs` type of the nsfs filesystem (`/proc/PID/ns/*`, bind mounts of them).
const NSFS_MAGIC: i64 = 0x6e73_6673;
/// `ioctl(fd, NS_GET_NSTYPE)`: the namespace's `CLONE_NEW*` type.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Opens `path` as a network namespace: non-blocking (a FIFO cannot hang
/// the caller), then `fstatfs` must say nsfs and the namespace must be a
/// network one.
pub fn open(path: &Path) -> Result<File, NetnsError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| NetnsError::Open { path: path.to_owned(), source })?;
    let kind = file
        .metadata()
        .map(|m| m.file_type())
        .map_err(|source| NetnsError::Open { path: path.to_owned(), source })?;
    let what = if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else if kind.is_dir() {
        "a directory"
    } else {
        ""
    };
    let not = |what| NetnsError::NotNetns { path: path.to_owned(), what };
    if !what.is_empty() {
        return Err(not(what));
    }
    // SAFETY: fstatfs into a zeroed struct on a descriptor we own.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
        let source = std::io::Error::last_os_error();
        return Err(NetnsError::Statfs { path: path.to_owned(), source });
    }
    #[allow(clippy::unnecessary_cast, reason = "f_type's width differs between libcs")]
    if fs.f_type as i64 != NSFS_MAGIC {
        return Err(not("a file"));
    }
    // SAFETY: an ioctl without arguments on a descriptor we own.
    let ns_type = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if ns_type != libc::CLONE_NEWNET {
        return Err(not("another kind of namespace"));
    }
    Ok(file)
}

/// Runs `f` with the calling thread in the network namespace `ns` (from
/// [`open`]) and returns it to its own before returning: sockets made in
/// `f` belong to `ns`. Synchronous, so no other task runs on the thread
/// meanwhile.
pub fn run_in<T>(ns: &File, f: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
    let own = File::open("/proc/thread-self/ns/net")?;
    // SAFETY: setns on valid namespace fds; affects only this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let result = f();
    // SAFETY: as above; back to the thread's own namespace.
    if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        // The thread is stranded in the container's namespace: no safe way on.
        panic!(
            "cannot return to the agent's network namespace: {}",
            std::io::Error::last_os_error()
        );
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_network_namespaces_are_taken() {
        assert!(open(Path::new("/proc/self/ns/net")).is_ok());
        let e = open(Path::new("/proc/self/ns/mnt")).unwrap_err().to_string();
        assert!(e.contains("another kind of namespace"), "{e}");
        let e = open(Path::new("/etc/hostname")).unwrap_err().to_string();
        assert!(e.contains("is a file, not a network namespace"), "{e}");
        let e = open(Path::new("/dev/null")).unwrap_err().to_string();
        assert!(e.contains("a device"), "{e}");
        let fifo = std::env::temp_dir().join(format!("netns-fifo-{}", std::process::id()));
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open(&fifo).unwrap_err().to_string();
        assert!(e.contains("is a FIFO"), "{e}");
        std::fs::remove_file(fifo).unwrap();
        assert!(
            open(Path::new("/nonexistent/ns")).unwrap_err().to_string().contains("cannot open")
        );
    }
}
