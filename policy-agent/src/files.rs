//! Files replaced whole: written to a temporary file beside them (with
//! their mode from the start), synced, then renamed over the old one, so a
//! reader or a crash sees the old file or the new one, never a part.

use std::{fs, io::Write as _, os::unix::fs::OpenOptionsExt as _, path::Path};

/// Replaces `path` with `bytes`, mode `mode` (e.g. 0o600 for keys).
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}
