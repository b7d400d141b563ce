//! The one BPF syscall aya 0.14 does not offer for every link type.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

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
    // SAFETY: attr is a valid bpf_attr prefix of the size passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &attr as *const LinkUpdateAttr,
            size_of::<LinkUpdateAttr>() as u32,
        )
    };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `BPF_OBJ_GET`.
const BPF_OBJ_GET: libc::c_long = 7;

/// `bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// Opens a pinned BPF object (here: a link) by path.
pub fn obj_get(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: attr points at a live NUL-terminated path for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGetAttr,
            size_of::<ObjGetAttr>() as u32,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(ret as i32) })
}

/// `BPF_LINK_DETACH`.
const BPF_LINK_DETACH: libc::c_long = 34;

/// Detaches a link now, whoever else still holds it. Dropping the last
/// reference also detaches, but the kernel frees links from a work queue
/// (kernel/bpf/syscall.c, `bpf_link_put`), so the hook may run the program
/// for a moment longer; an explicit detach is synchronous.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let link_fd: u32 = link.as_raw_fd() as u32;
    // SAFETY: a u32 link_fd is the whole bpf_attr for this command.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &link_fd as *const u32,
            size_of::<u32>() as u32,
        )
    };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
