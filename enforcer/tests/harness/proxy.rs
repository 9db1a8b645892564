//! A loopback TCP proxy that a test can cut and restore, to partition nodes for real:
//! while blocked, open connections are dropped and new ones are closed at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A proxy in front of one node.
pub struct Proxy {
    /// `127.0.0.1:PORT` to give to peers instead of the node's own address.
    pub addr: String,
    target: Arc<Mutex<Option<SocketAddr>>>,
    blocked: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// A proxy with no target yet: connections are closed until [`Proxy::set_target`].
    pub async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let blocked = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let (target, blocked, conns) = (target.clone(), blocked.clone(), conns.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        return;
                    };
                    let to = *target.lock().unwrap();
                    let Some(to) = to.filter(|_| !blocked.load(Ordering::SeqCst)) else {
                        drop(inbound);
                        continue;
                    };
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(to).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    let mut c = conns.lock().unwrap();
                    c.retain(|t| !t.is_finished());
                    c.push(task);
                }
            })
        };
        Proxy {
            addr,
            target,
            blocked,
            conns,
            accept,
        }
    }

    /// Where connections go (`http://host:port` or `host:port`).
    pub fn set_target(&self, endpoint: &str) {
        let a = endpoint.trim_start_matches("http://").parse().unwrap();
        *self.target.lock().unwrap() = Some(a);
    }

    /// Cuts every connection and refuses new ones.
    pub fn block(&self) {
        self.blocked.store(true, Ordering::SeqCst);
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// Lets connections through again.
    pub fn unblock(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.block();
    }
}
