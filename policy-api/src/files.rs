//! Files replaced whole: written to a temporary file beside them (with
//! their mode from the start), then renamed over the old one, so a reader
//! or a crash sees the old file or the new one, never a part. Every file
//! the agent and the plugin replace goes through here: the journal's
//! snapshot and header, the cluster state's local copy, keys, certificates,
//! bundles, leases.

use std::{
    ffi::OsString,
    fs::{self, File},
    io::{BufWriter, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

/// Replaces `path` with `bytes`, mode `mode` (e.g. 0o600 for keys), synced
/// before the rename: durable when this returns.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    write_and_rename(path, mode, true, |out| out.write_all(bytes))
}

/// Like [`replace`], with the contents streamed by `write` (a large state
/// is serialized straight into the file, never whole in memory).
pub fn replace_with(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    write_and_rename(path, mode, true, write)
}

/// Like [`replace`] without the fsync: for files the agent writes again at
/// every start (instance identities and ports), which must never be seen
/// half-written but need not survive a power cut.
pub fn replace_unsynced(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    write_and_rename(path, mode, false, |out| out.write_all(bytes))
}

/// `PATH.tmp`: beside it, and never another file's (`a.pem` and `a.key`,
/// or two leases `10.255.0.5` and `10.255.0.6`, keep theirs apart).
fn temporary(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".tmp");
    PathBuf::from(name)
}

fn write_and_rename(
    path: &Path,
    mode: u32,
    sync: bool,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let tmp = temporary(path);
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let file = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        let mut out = BufWriter::new(file);
        write(&mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        if sync {
            file.sync_all()?;
        }
        fs::rename(&tmp, path)
    })();
    // A write cut short (a full disk) leaves no partial file behind.
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_replaced_whole_with_its_mode_and_no_temporary_left() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("files-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("10.255.0.5");
        replace(&path, b"old", 0o600).unwrap();
        replace_with(&path, 0o600, |out| out.write_all(b"new")).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // A write that fails leaves the old file and no temporary.
        let failed = replace_with(&path, 0o600, |out| {
            out.write_all(b"part")?;
            Err(std::io::Error::other("cut short"))
        });
        assert!(failed.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![OsString::from("10.255.0.5")]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
