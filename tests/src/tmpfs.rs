//! A tmpfs of a given size mounted on a path (a disk that fills up on
//! demand), unmounted on drop.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

/// A tmpfs mounted on a path, unmounted on drop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(path)
            .status()
            .expect("mount");
        assert!(ok.success(), "mount tmpfs on {}", path.display());
        Self(path.to_owned())
    }

    /// Fills the filesystem with a file; returns its path.
    pub fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0xa5u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Temporary files (`*.tmp`) left in `dir`: a write cut short by a full
/// disk must leave none.
pub fn tmp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read the directory")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}
