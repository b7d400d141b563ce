//! Files replaced whole: written to a temporary file beside them (with
//! their mode from the start), then renamed over the old one, so a reader
//! or a crash sees the old file or the new one, never a part.

use std::{fs, io::Write as _, os::unix::fs::OpenOptionsExt as _, path::Path};

/// Replaces `path` with `bytes`, mode `mode` (e.g. 0o600 for keys), synced
/// before the rename: durable when this returns.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    write_and_rename(path, bytes, mode, true)
}

/// Like [`replace`] without the fsync: for files the agent writes again at
/// every start (instance identities and ports), which must never be seen
/// half-written but need not survive a power cut.
pub fn replace_unsynced(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    write_and_rename(path, bytes, mode, false)
}

fn write_and_rename(path: &Path, bytes: &[u8], mode: u32, sync: bool) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        file.write_all(bytes)?;
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
