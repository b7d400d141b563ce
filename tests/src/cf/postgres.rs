//! The policy server's database: Debian's PostgreSQL 15 as the `postgres`
//! user (it refuses root) on a data directory of its own, stopped and
//! removed on drop.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use super::network::Network;

/// Debian's PostgreSQL 15 (`cargo xtask setup` installs `postgresql`).
const POSTGRES_BIN: &str = "/usr/lib/postgresql/15/bin";

pub(super) struct Postgres {
    /// The data directory (the `postgres` user's).
    data: PathBuf,
    child: Option<Child>,
    /// Where it listens on its network's loopback.
    port: u16,
    /// The database made at start.
    database: String,
}

impl Postgres {
    /// `initdb`, then `postgres` in `network` listening on its loopback
    /// only at `port` (its unix socket in the data directory), its output
    /// appended to `log`; then the `database`. No fsync: the data dies with
    /// the test.
    pub(super) fn start(
        network: &Network,
        data: PathBuf,
        port: u16,
        log: &Path,
        database: &str,
    ) -> Self {
        let user = postgres_user();
        fs::create_dir(&data).expect("postgres data dir");
        let mut postgres = Self { data, child: None, port, database: database.to_owned() };
        std::os::unix::fs::chown(&postgres.data, Some(user.0), Some(user.1))
            .expect("chown data dir");
        let data = postgres.data.display().to_string();
        // initdb opens no socket: it may run in any network.
        let out = as_postgres(network.command_as(format!("{POSTGRES_BIN}/initdb"), user))
            .args(["-D", &data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync")
            .output()
            .expect("run initdb (Debian's postgresql 15; `cargo xtask setup` installs it)");
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let log =
            fs::OpenOptions::new().create(true).append(true).open(log).expect("open postgres log");
        let port = port.to_string();
        let child = as_postgres(network.command_as(format!("{POSTGRES_BIN}/postgres"), user))
            .args(["-D", &data, "-p", &port, "-k", &data])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("postgres log"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        postgres.child = Some(child);
        // createdb fails while Postgres is still starting up: retry.
        let started = Instant::now();
        loop {
            let Err(e) = postgres.create_database(network, database) else {
                return postgres;
            };
            if let Some(status) = postgres.exited() {
                panic!("postgres exited: {status} (its log follows)");
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "createdb: {e} (postgres's log follows)",
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `createdb NAME` (in `network`, as the `postgres` user): createdb's
    /// error if it fails.
    pub(super) fn create_database(&self, network: &Network, name: &str) -> Result<(), String> {
        let port = self.port.to_string();
        let out =
            as_postgres(network.command_as(format!("{POSTGRES_BIN}/createdb"), postgres_user()))
                .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", name])
                .output()
                .map_err(|e| format!("run createdb: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }

    /// Runs `sql` in the database as `psql` does (in `network`, as the
    /// `postgres` user), stopping at the first error; `vars` are psql
    /// variables, which the SQL names `:'NAME'` to have them quoted as
    /// literals. Psql's output, or its error.
    pub(super) fn psql(
        &self,
        network: &Network,
        sql: &str,
        vars: &[(&str, &str)],
    ) -> Result<String, String> {
        let user = postgres_user();
        let mut cmd = as_postgres(network.command_as(format!("{POSTGRES_BIN}/psql"), user));
        let port = self.port.to_string();
        cmd.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-d", &self.database]);
        // No psqlrc, quiet, bare rows; an error ends the script.
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]);
        for (name, value) in vars {
            cmd.arg("-v").arg(format!("{name}={value}"));
        }
        // From stdin: psql interpolates variables in a script, not in -c.
        let mut child = cmd
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("run psql: {e}"))?;
        let written = child.stdin.take().map(|mut stdin| stdin.write_all(sql.as_bytes()));
        let out = child.wait_with_output().map_err(|e| format!("wait for psql: {e}"))?;
        if let Some(Err(e)) = written {
            return Err(format!("write to psql: {e}"));
        }
        if !out.status.success() {
            return Err(format!("psql {}: {}", out.status, String::from_utf8_lossy(&out.stderr)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The server's PID (the `postgres` program's own, not a wrapper's).
    pub(super) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How Postgres exited, if it has.
    pub(super) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|child| child.try_wait().ok().flatten())
    }
}

impl Drop for Postgres {
    /// Postgres's "fast shutdown" (SIGINT: its backends are told to exit
    /// and its shared memory is released), SIGKILL if it takes more than
    /// 5 s; then the data directory goes.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child);
        }
        let _ = fs::remove_dir_all(&self.data);
    }
}

fn stop(postgres: &mut Child) {
    if let Ok(pid) = i32::try_from(postgres.id()) {
        // SAFETY: kill has no memory preconditions; the PID is our child's,
        // not yet reaped, so it cannot name another process.
        unsafe { libc::kill(pid, libc::SIGINT) };
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if !matches!(postgres.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = postgres.kill();
    let _ = postgres.wait();
}

/// The `postgres` user's uid and gid (Debian's postgresql-common makes it).
fn postgres_user() -> (u32, u32) {
    // SAFETY: the name is a valid C string; the entry is read at once,
    // before any other getpw* call could overwrite it.
    let entry = unsafe { libc::getpwnam(c"postgres".as_ptr()) };
    assert!(!entry.is_null(), "no `postgres` user: install postgresql (`cargo xtask setup`)");
    // SAFETY: not null, so a valid passwd entry.
    unsafe { ((*entry).pw_uid, (*entry).pw_gid) }
}

/// What every Postgres program wants besides its user: a directory it may
/// read (not root's current one) and the user's home.
fn as_postgres(mut cmd: Command) -> Command {
    cmd.current_dir("/").env("HOME", "/var/lib/postgresql");
    cmd
}
