//! A TCP relay a test can break on purpose: between a node and Redis it makes the
//! faults a real network makes (a peer that stops answering, a connection that dies)
//! at the moment the test chooses, which a real server cannot be asked to do.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

/// Relays every connection made to [`FaultProxy::addr`] to an upstream address.
pub struct FaultProxy {
    /// Where to connect instead of the upstream.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    /// While set, bytes from clients are held back (the upstream seems to hang).
    stalled: AtomicBool,
    /// The relays of the open connections.
    relays: Mutex<Vec<AbortHandle>>,
}

impl FaultProxy {
    /// Starts relaying `127.0.0.1:<random>` to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let relay = tokio::spawn(relay(client, server, s.clone()));
                let mut relays = s.relays.lock().expect("relays");
                relays.retain(|r| !r.is_finished());
                relays.push(relay.abort_handle());
            }
        });
        FaultProxy {
            addr,
            shared,
            accept,
        }
    }

    /// Holds back what clients send from now on (their requests get no answer), or
    /// lets it through again.
    pub fn stall(&self, on: bool) {
        self.shared.stalled.store(on, Ordering::SeqCst);
    }

    /// Closes every open connection (new ones are relayed, not stalled).
    pub fn cut(&self) {
        self.stall(false);
        for r in self.shared.relays.lock().expect("relays").drain(..) {
            r.abort();
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn relay(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = client_read.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            while shared.stalled.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            server_write.write_all(&buf[..n]).await?;
        }
    };
    let downstream = tokio::io::copy(&mut server_read, &mut client_write);
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}
