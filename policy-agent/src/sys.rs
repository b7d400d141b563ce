//! The BPF syscalls aya 0.14 does not offer for every object type.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

/// `bpf(cmd, attr, sizeof attr)`.
fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: every caller passes a valid bpf_attr prefix for `cmd`, whose
    // pointers (if any) stay live for the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>() as u32) };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// `BPF_LINK_UPDATE` from include/uapi/linux/bpf.h.
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `bpf_attr.link_update`.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Atomically replaces the program behind `link` (TCX and cgroup links): the
/// hook never runs without a program in between. See kernel/bpf/syscall.c,
/// `link_update`.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &attr).map(drop)
}

/// `BPF_OBJ_PIN` and `BPF_OBJ_GET`.
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;

/// `bpf_attr` for `BPF_OBJ_PIN` and `BPF_OBJ_GET`.
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `BPF_OBJ_PIN` (with `object`) or `BPF_OBJ_GET` (without) of `path`.
fn obj_path(cmd: libc::c_long, path: &Path, object: Option<BorrowedFd<'_>>) -> io::Result<i64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: object.map_or(0, |fd| fd.as_raw_fd() as u32),
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    bpf(cmd, &attr)
}

/// Opens a pinned BPF object by path.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let fd = obj_path(BPF_OBJ_GET, path, None)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins a BPF object (here: a program) at `path` on a bpffs.
pub fn obj_pin(object: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    obj_path(BPF_OBJ_PIN, path, Some(object)).map(drop)
}

/// `BPF_LINK_DETACH`.
const BPF_LINK_DETACH: libc::c_long = 34;

/// Detaches a link now, whoever else still holds it. Dropping the last
/// reference also detaches, but the kernel frees links from a work queue
/// (kernel/bpf/syscall.c, `bpf_link_put`), so the hook may run the program
/// for a moment longer; an explicit detach is synchronous.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    // A u32 link_fd is the whole bpf_attr for this command.
    bpf(BPF_LINK_DETACH, &(link.as_raw_fd() as u32)).map(drop)
}

/// `BPF_OBJ_GET_INFO_BY_FD`.
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `bpf_attr.info`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// A program's id (the first two words of `bpf_prog_info` are its type and
/// id; the kernel copies no more than the length asked for).
pub fn prog_id(program: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = [0u32; 2];
    let attr = InfoAttr {
        bpf_fd: program.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    Ok(info[1])
}

/// Whether `fd` is a BPF link, not a program: its anonymous inode is
/// `bpf-link` (`bpf_link` when the link was made) and a program's
/// `bpf-prog` (kernel/bpf/syscall.c).
pub fn is_link(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).is_ok_and(|target| {
        let target = target.to_string_lossy();
        target.contains("bpf-link") || target.contains("bpf_link")
    })
}
