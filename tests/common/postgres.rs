//! A real PostgreSQL server for the cluster tests, started in a temporary directory on loopback
//! and stopped (immediate mode) when dropped.
//!
//! The server binaries are found in `FENCEGATE_PG_BIN`, else the newest
//! `/usr/lib/postgresql/*/bin` (Debian's `apt-get install postgresql`), else `PATH`. `initdb` and
//! `postgres` refuse to run as root, so as root they run as the `postgres` user (`setpriv`, which
//! execs, so the child we hold is the server itself). Without PostgreSQL [`Postgres::start`]
//! returns `None` after saying loudly that the test was skipped, unless
//! `FENCEGATE_CLUSTER_REQUIRED` is set (as in CI): then it panics.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The database every test cluster uses (created by `initdb`'s superuser `fencegate`).
pub const DATABASE: &str = "postgres";

pub struct Postgres {
    child: Option<Child>,
    bin: PathBuf,
    data: PathBuf,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    /// Set by [`Postgres::require_tls`]: the server's certificate and key files.
    tls: Option<(PathBuf, PathBuf)>,
}

impl Postgres {
    /// Starts a fresh server, or returns `None` (after saying so) if PostgreSQL is not installed.
    pub fn start() -> Option<Postgres> {
        let Some(bin) = find_binaries() else {
            skipped("PostgreSQL (initdb, postgres) is not installed");
            return None;
        };
        let dir = tempfile::tempdir().expect("temporary directory");
        let data = dir.path().join("data");
        if running_as_root() {
            // The server's user must own its directory and be able to reach it.
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("run chown");
            assert!(status.success(), "chown of the PostgreSQL directory failed");
        }
        let output = as_server_user(&bin.join("initdb"))
            .args([
                "--auth=trust",
                "--username=fencegate",
                "--no-sync",
                "--encoding=UTF8",
            ])
            .arg("-D")
            .arg(&data)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("run initdb");
        assert!(
            output.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let port = free_port();
        let mut postgres = Postgres {
            child: None,
            bin,
            data,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            tls: None,
        };
        postgres.run();
        Some(postgres)
    }

    /// The URL fencegate is given: `postgres://fencegate@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://fencegate@{}/{DATABASE}", self.addr)
    }

    /// The same server at another address (an in-test TCP proxy in front of it, say).
    pub fn url_via(&self, addr: SocketAddr) -> String {
        format!("postgres://fencegate@{addr}/{DATABASE}")
    }

    /// Stops the server as a crash would (SIGKILL of the postmaster is not safe for its shared
    /// memory; immediate shutdown is PostgreSQL's own "crash now": no checkpoint, recovery at the
    /// next start) and starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop_immediately();
        self.run();
    }

    /// From now on (it restarts) the server speaks TLS with `cert` and `key`, and refuses plain
    /// TCP connections (`hostssl` only in pg_hba.conf).
    pub fn require_tls(&mut self, cert: &Path, key: &Path) {
        let (server_cert, server_key) = (
            self.dir.path().join("server.crt"),
            self.dir.path().join("server.key"),
        );
        std::fs::copy(cert, &server_cert).unwrap();
        std::fs::copy(key, &server_key).unwrap();
        // PostgreSQL refuses a key that others may read.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&server_key, std::fs::Permissions::from_mode(0o600)).unwrap();
        if running_as_root() {
            let status = Command::new("chown")
                .arg("postgres:postgres")
                .args([&server_cert, &server_key])
                .status()
                .unwrap();
            assert!(status.success());
        }
        std::fs::write(
            self.data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        self.tls = Some((server_cert, server_key));
        self.restart();
    }

    /// Stops the server without a checkpoint, as a crash would.
    pub fn stop_immediately(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGQUIT is PostgreSQL's immediate shutdown.
        let _ = Command::new("kill")
            .args(["-QUIT", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn run(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("log file");
        let child = as_server_user(&self.bin.join("postgres"))
            .arg("-D")
            .arg(&self.data)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-p", &self.addr.port().to_string()])
            .args([
                "-c",
                &format!("unix_socket_directories={}", self.dir.path().display()),
            ])
            // Enough for several replicas, each with a few connections, and the tests' own.
            .args(["-c", "max_connections=200"])
            // The tests crash and restart the server, never the machine: fsync would only make
            // them slower (the page cache outlives a crashed server).
            .args(["-c", "fsync=off"])
            .args(self.tls.iter().flat_map(|(cert, key)| {
                [
                    "-c".to_owned(),
                    "ssl=on".to_owned(),
                    "-c".to_owned(),
                    format!("ssl_cert_file={}", cert.display()),
                    "-c".to_owned(),
                    format!("ssl_key_file={}", key.display()),
                ]
            }))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        self.wait_until_ready();
    }

    fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(self.addr).is_ok() && self.accepts_queries() {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "postgres exited with {status} before accepting connections:\n{}",
                    self.server_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not accept connections within 30 s:\n{}",
                self.server_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the server answers a query (it listens before recovery has finished).
    fn accepts_queries(&self) -> bool {
        Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.addr.port().to_string()])
            .args(["-U", "fencegate", "-d", DATABASE, "-tAc", "SELECT 1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// Runs `sql` with psql and returns its unaligned output (`|` between columns).
    pub fn query(&self, sql: &str) -> String {
        let output = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.addr.port().to_string()])
            .args([
                "-U",
                "fencegate",
                "-d",
                DATABASE,
                "-v",
                "ON_ERROR_STOP=1",
                "-tAc",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            output.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("psql prints UTF-8")
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop_immediately();
    }
}

fn find_binaries() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("FENCEGATE_PG_BIN") {
        return Some(PathBuf::from(bin));
    }
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("postgres").is_file())
        .collect();
    debian.sort_by_key(|bin| major_version(bin));
    if let Some(newest) = debian.pop() {
        return Some(newest);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path).find(|dir| {
            dir.join("postgres").is_file()
                && dir.join("initdb").is_file()
                && dir.join("psql").is_file()
        })
    })
}

fn major_version(bin: &Path) -> u32 {
    bin.parent()
        .and_then(|dir| dir.file_name())
        .and_then(|name| name.to_str())
        .and_then(|name| name.parse().ok())
        .unwrap_or(0)
}

fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `program` as a command run by the user PostgreSQL accepts: ourselves, or `postgres` if we are
/// root (`setpriv` execs it, so the child is the program itself, not a wrapper).
fn as_server_user(program: &Path) -> Command {
    if running_as_root() {
        let mut command = Command::new("setpriv");
        command
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn skipped(why: &str) {
    let message = format!(
        "SKIPPED: {why}, so the cluster tests did not run. Install it with \
         `apt-get install postgresql` (or set FENCEGATE_PG_BIN to its bin directory)."
    );
    assert!(
        std::env::var_os("FENCEGATE_CLUSTER_REQUIRED").is_none(),
        "{message} (FENCEGATE_CLUSTER_REQUIRED is set)"
    );
    // Written to the real stderr, not through the test harness, which would swallow it.
    let _ = writeln!(
        std::io::stderr(),
        "\n{}\n{message}\n{}\n",
        "!".repeat(72),
        "!".repeat(72)
    );
}
