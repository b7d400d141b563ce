//! A scratch root to install a Debian package into with `dpkg --root`,
//! holding the package's dependencies and nothing else: their files, copied
//! from this host's installed copies, and their entries in a dpkg database
//! of its own. So dpkg checks the package's Depends without being forced,
//! and a program run chrooted there finds only what those dependencies
//! provide. The host's own root and dpkg database are never written.
//! Removed on drop.

use std::{
    collections::BTreeSet,
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
    process::{Command, Output},
};

pub struct ScratchRoot {
    path: PathBuf,
}

impl ScratchRoot {
    /// A root holding what `depends` (a control file's Depends field) names,
    /// with everything those packages depend on in turn.
    pub fn with_depends(depends: &str) -> Self {
        let root = Self { path: std::env::temp_dir().join(crate::unique_name("root")) };
        fs::create_dir(&root.path).expect("create the scratch root");
        root.merge_usr_as_host();
        for dir in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/log"] {
            fs::create_dir_all(root.path(dir)).expect("create the dpkg directories");
        }
        let mut status = String::new();
        for package in closure(depends) {
            root.copy_files_of(&package);
            status += &query(&["--status", &package]);
            status += "\n";
        }
        fs::write(root.path("var/lib/dpkg/status"), status).expect("write the dpkg status");
        root
    }

    /// `rel` (relative to the root) in the host's view.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.path.join(rel.trim_start_matches('/'))
    }

    /// `dpkg ARGS` on this root. Maintainer scripts run on the host with
    /// `DPKG_ROOT` set (the root has no shell), as in mmdebstrap's chrootless
    /// mode: the package's scripts then leave the host's systemd alone.
    pub fn dpkg(&self, args: &[&str]) -> Output {
        Command::new("dpkg")
            .arg(format!("--root={}", self.path.display()))
            .arg(format!("--log={}", self.path("var/log/dpkg.log").display()))
            .arg("--force-script-chrootless")
            .args(args)
            .output()
            .expect("run dpkg")
    }

    /// The package's `Status` in this root's database (`install ok
    /// installed`), or None when dpkg knows nothing of it.
    pub fn status(&self, package: &str) -> Option<String> {
        let admin = format!("--admindir={}", self.path("var/lib/dpkg").display());
        let out = Command::new("dpkg-query")
            .args([&admin, "--show", "--showformat=${Status}", package])
            .output()
            .expect("run dpkg-query");
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `program` (a path inside the root) run chrooted there.
    pub fn chroot(&self, program: &str) -> Command {
        let mut cmd = Command::new("chroot");
        cmd.arg(&self.path).arg(program);
        cmd
    }

    /// On a merged-/usr host /bin, /lib, ... are links into /usr, and the
    /// dependencies' files name either path: the root gets the same links.
    fn merge_usr_as_host(&self) {
        for dir in ["bin", "sbin", "lib", "lib64"] {
            if let Ok(target) = fs::read_link(Path::new("/").join(dir)) {
                fs::create_dir_all(self.path.join(&target)).expect("create a /usr directory");
                std::os::unix::fs::symlink(&target, self.path(dir)).expect("link a /usr directory");
            }
        }
    }

    /// The files `package` installed on the host, and its file list.
    fn copy_files_of(&self, package: &str) {
        let list = query(&["--listfiles", package]);
        // Lines other than paths say where a file was diverted to.
        for file in list.lines().filter(|line| line.starts_with('/') && *line != "/.") {
            let (from, to) = (Path::new(file), self.path(file));
            let Ok(meta) = fs::symlink_metadata(from) else {
                continue; // excluded from this host's install (dpkg path-exclude)
            };
            if from.is_dir() {
                fs::create_dir_all(&to).expect("create a dependency's directory");
            } else if meta.is_symlink() {
                let target = fs::read_link(from).expect("read a dependency's link");
                match std::os::unix::fs::symlink(target, &to) {
                    Err(e) if e.kind() != ErrorKind::AlreadyExists => {
                        panic!("copy link {file} into the scratch root: {e}")
                    }
                    _ => {}
                }
            } else {
                fs::copy(from, &to)
                    .unwrap_or_else(|e| panic!("copy {file} into the scratch root: {e}"));
            }
        }
        fs::write(self.path(&format!("var/lib/dpkg/info/{package}.list")), list)
            .expect("write a dependency's file list");
    }
}

impl Drop for ScratchRoot {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("warning: could not remove {}: {e}", self.path.display());
        }
    }
}

/// `dpkg-query ARGS` on the host's database.
fn query(args: &[&str]) -> String {
    let out = Command::new("dpkg-query").args(args).output().expect("run dpkg-query");
    assert!(
        out.status.success(),
        "dpkg-query {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The installed packages `depends` names, and theirs, by dpkg's name for
/// them (`libc6:amd64`). Of alternatives (`a | b`), the first installed.
fn closure(depends: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut todo = vec![depends.to_owned()];
    while let Some(field) = todo.pop() {
        for group in field.split(',').map(str::trim).filter(|g| !g.is_empty()) {
            let package = group
                .split('|')
                .find_map(|alternative| {
                    // `name:any (>= 1.0)`: the name, without an architecture.
                    let name = alternative.split_whitespace().next()?.split(':').next()?;
                    let out = Command::new("dpkg-query")
                        .args([
                            "--show",
                            "--showformat=${db:Status-Status} ${binary:Package}\n",
                            name,
                        ])
                        .output()
                        .ok()?;
                    String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .find_map(|line| line.strip_prefix("installed ").map(str::to_owned))
                })
                .unwrap_or_else(|| panic!("no package of `{group}` is installed on this host"));
            if found.insert(package.clone()) {
                todo.push(query(&["--show", "--showformat=${Depends}, ${Pre-Depends}", &package]));
            }
        }
    }
    found
}
