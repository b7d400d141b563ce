//! The BPF filesystem the pins live on.

use std::{ffi::CString, io, os::unix::ffi::OsStrExt as _, path::Path};

use crate::DataplaneError;

/// `BPF_FS_MAGIC` from include/uapi/linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is conventionally mounted.
pub const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let ret = unsafe { libc::statfs(c_path.as_ptr(), &mut st) };
    ret == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Makes sure `pin_dir` can hold pins: mounts bpffs at /sys/fs/bpf when the
/// directory is below it and nothing is mounted there yet (Debian does not
/// mount it by default), then creates the directory.
pub fn prepare(pin_dir: &Path) -> Result<(), DataplaneError> {
    let mount = Path::new(DEFAULT_MOUNT);
    if pin_dir.starts_with(mount) && !is_bpffs(mount) {
        mount_bpffs(mount)?;
    }
    std::fs::create_dir_all(pin_dir)
        .map_err(DataplaneError::io("cannot create pin directory", pin_dir))?;
    if !is_bpffs(pin_dir) {
        return Err(DataplaneError::NotBpffs { path: pin_dir.to_path_buf() });
    }
    Ok(())
}

fn mount_bpffs(at: &Path) -> Result<(), DataplaneError> {
    let fail = |source| DataplaneError::MountBpffs { path: at.to_path_buf(), source };
    let target = CString::new(at.as_os_str().as_bytes()).map_err(|e| fail(e.into()))?;
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let ret = unsafe {
        libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null())
    };
    if ret != 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    Ok(())
}
