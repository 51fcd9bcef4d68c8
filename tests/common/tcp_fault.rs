//! An in-test TCP proxy that can pass traffic, black-hole it, or reset every connection: how a
//! cluster test cuts one replica off from PostgreSQL without touching the others.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// Connections stay open but nothing goes through, either way (a partition).
    BlackHole,
    /// Every connection is closed at once, new ones too (a crashed or restarted peer).
    Reset,
}

#[derive(Clone)]
pub struct TcpFault {
    pub addr: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
}

impl TcpFault {
    /// A proxy on a free loopback port in front of `target`, passing traffic.
    pub async fn start(target: SocketAddr) -> TcpFault {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(watch::Sender::new(Mode::Pass));
        let fault = TcpFault {
            addr,
            mode: Arc::clone(&mode),
        };
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mode = mode.subscribe();
                tokio::spawn(relay(client, target, mode));
            }
        });
        fault
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

async fn relay(client: TcpStream, target: SocketAddr, mut mode: watch::Receiver<Mode>) {
    let _ = client.set_nodelay(true);
    // A black hole accepts and then says nothing; a reset closes at once.
    if !until_passing(&mut mode).await {
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        () = pump(client_read, server_write, mode.clone()) => {}
        () = pump(server_read, client_write, mode) => {}
    }
}

/// Copies `from` to `to` while the mode passes; holds the bytes while it black-holes (they go
/// through if the hole closes, as TCP retransmission would deliver them); returns on a reset.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buffer = vec![0_u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            changed = mode.changed() => {
                if changed.is_err() || *mode.borrow() == Mode::Reset {
                    return;
                }
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !until_passing(&mut mode).await {
            return;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// Waits while the mode black-holes; `true` once it passes, `false` on a reset.
async fn until_passing(mode: &mut watch::Receiver<Mode>) -> bool {
    loop {
        let now = *mode.borrow_and_update();
        match now {
            Mode::Pass => return true,
            Mode::Reset => return false,
            Mode::BlackHole => {
                if mode.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}
