//! Sockets inside a pod's network namespace.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole
//! life. sluice runs in the node's namespace, so for each enrolled pod it keeps one small
//! thread that has entered the pod's namespace (`setns`) and creates sockets there: the pod's
//! listeners, and the upstream sockets of connections from that pod (so that the backend sees
//! the pod's own IP as the source, and NetworkPolicy keeps working).
//!
//! Creating a socket through another thread costs a wake-up; to keep that off the data path,
//! the worker keeps a few ready sockets per family in a pool and refills it in the background.

use std::{
    io,
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{mpsc, Arc, Mutex},
    thread,
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::podres::NetnsHandle;

/// Ready sockets kept per family.
const POOL_TARGET: usize = 8;

type Job = Box<dyn FnOnce() + Send>;

enum Request {
    Listen(Vec<SocketAddr>, mpsc::SyncSender<Vec<io::Result<std::net::TcpListener>>>),
    Run(Job),
    Socket(Domain, oneshot::Sender<io::Result<Socket>>),
    Refill,
}

/// Handle on one pod network namespace's worker thread. Dropping the last handle stops it.
pub struct PodNetns {
    // std's Sender is Sync: the data path sends without a lock.
    tx: mpsc::Sender<Request>,
    pools: Arc<Pools>,
    inode: u64,
}

#[derive(Default)]
struct Pools {
    v4: Mutex<Vec<Socket>>,
    v6: Mutex<Vec<Socket>>,
}

impl Pools {
    fn pool(&self, domain: Domain) -> &Mutex<Vec<Socket>> {
        if domain == Domain::IPV6 {
            &self.v6
        } else {
            &self.v4
        }
    }
}

impl PodNetns {
    /// Starts the worker thread in the namespace `netns` refers to.
    pub fn spawn(netns: NetnsHandle, label: &str) -> io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel::<Request>();
        let pools = Arc::new(Pools::default());
        let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
        let worker_pools = pools.clone();
        let inode = netns.inode;
        thread::Builder::new()
            .name(format!("netns-{label}"))
            .spawn(move || {
                // SAFETY: setns on this thread only; the fd is a valid namespace fd we own.
                let rc = unsafe { libc::setns(netns.fd.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    let _ = ready_tx.send(Err(io::Error::last_os_error()));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                drop(netns);
                refill(&worker_pools, Domain::IPV4);
                for req in rx {
                    match req {
                        Request::Listen(addrs, reply) => {
                            let _ = reply.send(addrs.iter().map(|a| listen(*a)).collect());
                        }
                        Request::Run(job) => job(),
                        Request::Socket(domain, reply) => {
                            let _ = reply.send(new_socket(domain));
                        }
                        Request::Refill => {
                            refill(&worker_pools, Domain::IPV4);
                            if !worker_pools.v6.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
                                refill(&worker_pools, Domain::IPV6);
                            }
                        }
                    }
                }
                debug!("netns worker stopped");
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Arc::new(Self { tx, pools, inode })),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::other("netns worker thread died during start")),
        }
    }

    fn send(&self, req: Request) -> io::Result<()> {
        self.tx
            .send(req)
            .map_err(|_| io::Error::other("netns worker thread is gone"))
    }

    /// Opens listening sockets inside the namespace, one result per address (blocking:
    /// control path only).
    pub fn listen(&self, addrs: &[SocketAddr]) -> io::Result<Vec<io::Result<std::net::TcpListener>>> {
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        self.send(Request::Listen(addrs.to_vec(), reply_tx))?;
        reply_rx.recv().map_err(|_| io::Error::other("netns worker thread is gone"))
    }

    /// Runs `f` on the thread that lives in the pod's network namespace (blocking: control path
    /// only). Anything namespace-relative `f` does (creating sockets, opening /proc/sys/net,
    /// spawning `ip`) applies to the pod's namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Request::Run(Box::new(move || {
            let _ = tx.send(f());
        })))?;
        rx.recv().map_err(|_| io::Error::other("netns worker thread is gone"))
    }

    /// A fresh, unconnected, non-blocking TCP socket in the namespace, for a connection to `dst`.
    pub async fn tcp_socket(&self, dst: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
        let domain = if dst.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
        let pooled = self.pools.pool(domain).lock().unwrap_or_else(|p| p.into_inner()).pop();
        let socket = match pooled {
            Some(s) => {
                let _ = self.send(Request::Refill);
                s
            }
            None => {
                let (tx, rx) = oneshot::channel();
                self.send(Request::Socket(domain, tx))?;
                let s = rx.await.map_err(|_| io::Error::other("netns worker thread is gone"))??;
                if domain == Domain::IPV6 {
                    // First IPv6 use: start keeping a pool for this family too.
                    let _ = self.send(Request::Refill);
                }
                s
            }
        };
        let std_stream: std::net::TcpStream = socket.into();
        Ok(tokio::net::TcpSocket::from_std_stream(std_stream))
    }

    pub fn inode(&self) -> u64 {
        self.inode
    }
}

fn new_socket(domain: Domain) -> io::Result<Socket> {
    let s = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
    s.set_nodelay(true)?;
    // Every socket sluice makes carries traffic (upstream, delivery, tunnel): a vanished peer
    // must not hold it forever.
    crate::idle::set_keepalive(socket2::SockRef::from(&s))?;
    Ok(s)
}

fn refill(pools: &Pools, domain: Domain) {
    let pool = pools.pool(domain);
    loop {
        if pool.lock().unwrap_or_else(|p| p.into_inner()).len() >= POOL_TARGET {
            return;
        }
        match new_socket(domain) {
            Ok(s) => pool.lock().unwrap_or_else(|p| p.into_inner()).push(s),
            Err(e) => {
                warn!(error = %e, "cannot pre-create sockets in pod network namespace");
                return;
            }
        }
    }
}

fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    // The next sluice process binds the same addresses during an upgrade.
    s.set_reuse_port(true)?;
    // Accepted sockets inherit keepalive from their listener (no system call per connection).
    crate::idle::set_keepalive(socket2::SockRef::from(&s))?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}
