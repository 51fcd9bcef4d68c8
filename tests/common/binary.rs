//! The real `fencegate` binary as a child process, for tests of what only a process can show:
//! `kill -9`, signals, start-up refusals.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Proxy {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// Every line the server has written to stderr so far.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Proxy {
    /// Whether a line of the server's log so far contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.log
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.contains(text))
    }
}

impl Drop for Proxy {
    /// A failing test must not leave a server behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `fencegate serve` with `config` and `db`, both planes on free loopback ports.
pub fn serve_command(config: &Path, db: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fencegate"));
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(config)
        .arg("--db")
        .arg(db);
    command
}

/// Starts `fencegate serve` on free ports, one resource per `/crash/{id}`, and waits until ready.
pub async fn start_binary(upstream: &str, db: &Path) -> Proxy {
    start_binary_with(upstream, db, "").await
}

/// As [`start_binary`], with `settings` (TOML keys) at the top of the config file.
pub async fn start_binary_with(upstream: &str, db: &Path, settings: &str) -> Proxy {
    start(serve_command(&write_config(upstream, db, settings), db)).await
}

/// Writes the config file of [`start_binary_with`] next to `db` and returns its path.
pub fn write_config(upstream: &str, db: &Path, settings: &str) -> std::path::PathBuf {
    let config = db.with_extension("toml");
    std::fs::write(
        &config,
        format!("{settings}\n[[routes]]\npath = \"/crash/{{id}}\"\nupstream = \"{upstream}\"\nresource = \"crash:{{id}}\"\n"),
    )
    .unwrap();
    config
}

/// Starts `command` (a `fencegate serve`, possibly wrapped) and waits until it is ready. Logs at
/// INFO (`RUST_LOG=info`) unless `command` sets or removes `RUST_LOG` itself.
pub async fn start(command: Command) -> Proxy {
    let proxy = start_serving(command).await;
    let ready = format!("http://{}/readyz", proxy.admin);
    for _ in 0..200 {
        if reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200) {
            return proxy;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("fencegate never became ready");
}

/// As [`start`], but returns once the server has logged its addresses, without asking the admin
/// plane whether it is ready (a test that speaks TLS to it asks itself).
pub async fn start_serving(mut command: Command) -> Proxy {
    if !command.get_envs().any(|(key, _)| key == "RUST_LOG") {
        command.env("RUST_LOG", "info");
    }
    let child = command
        .stderr(Stdio::piped())
        .spawn()
        .expect("the fencegate binary starts");
    let unbound = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut proxy = Proxy {
        child,
        addr: unbound,
        admin: unbound,
        log: Default::default(),
    };
    let stderr = proxy.child.stderr.take().unwrap();
    let (found, addresses) = std::sync::mpsc::channel();
    let log = std::sync::Arc::clone(&proxy.log);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            log.lock().unwrap().push(line.clone());
            if line.contains("fencegate serving") {
                let address = |key: &str| -> SocketAddr {
                    let start = line.find(key).unwrap() + key.len();
                    line[start..]
                        .split_whitespace()
                        .next()
                        .unwrap()
                        .parse()
                        .unwrap()
                };
                let _ = found.send((address("data="), address("admin=")));
            }
        }
    });
    let logged =
        tokio::task::spawn_blocking(move || addresses.recv_timeout(Duration::from_secs(20)))
            .await
            .unwrap();
    let Ok((data, admin)) = logged else {
        // Say why: a fencegate that exited at start-up (a port taken, a database refused) has
        // logged the reason, and the test's own panic would not show it.
        let exit = proxy.child.try_wait();
        let log = proxy.log.lock().unwrap().join("\n");
        panic!("fencegate did not log its addresses ({logged:?}; exit: {exit:?}); its log:\n{log}");
    };
    proxy.addr = data;
    proxy.admin = admin;
    proxy
}

/// A fenced PUT of `/crash/{resource}`: the status and `Fencing-Token-Highest`, or `None` if
/// there was no answer.
pub async fn put(
    client: &reqwest::Client,
    addr: SocketAddr,
    resource: usize,
    token: u64,
) -> Option<(u16, u64)> {
    let response = client
        .put(format!("http://{addr}/crash/{resource}"))
        .header("fencing-token", token.to_string())
        .send()
        .await
        .ok()?;
    let highest = response
        .headers()
        .get("fencing-token-highest")?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some((response.status().as_u16(), highest))
}
