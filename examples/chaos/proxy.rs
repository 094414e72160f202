//! A fault-injecting TCP proxy: what a hostile network does to a client and a server.
//!
//! Each connection it accepts gets a fate, drawn from a seeded generator:
//!
//! - **drop after forward**: the request goes to the server, the answer is swallowed, and both
//!   sides are closed once the server has answered (or gone quiet): the operation ran, the
//!   client never heard;
//! - **reset**: part of the request goes to the server, then both sides are reset (RST): the
//!   server never gets a whole request;
//! - **delay**: the answer is held back for a while before it flows;
//! - **pass**: untouched, but never for longer than [`Faults::max_lifetime`], after which the
//!   connection is cut wherever its traffic is (what an HTTP/2 channel, which keeps one
//!   connection for every call, meets on a flaky network).
//!
//! The upstream can be changed while the proxy runs ([`ChaosProxy::set_upstream`]), and while
//! nothing listens there every connection is closed at once, as a restarting server does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// The share of connections given each fault (the rest pass), and its sizes.
#[derive(Debug, Clone)]
pub(crate) struct Faults {
    /// Forward the request, swallow the answer, close.
    pub(crate) drop_after_forward: f64,
    /// Forward part of the request, then reset.
    pub(crate) reset: f64,
    /// Hold the answer back for up to `max_delay`.
    pub(crate) delay: f64,
    /// The longest delay.
    pub(crate) max_delay: Duration,
    /// The longest a passing connection lives (`None`: as long as its ends want).
    pub(crate) max_lifetime: Option<Duration>,
}

impl Faults {
    /// No faults.
    #[allow(dead_code)]
    pub(crate) fn none() -> Self {
        Faults {
            drop_after_forward: 0.0,
            reset: 0.0,
            delay: 0.0,
            max_delay: Duration::ZERO,
            max_lifetime: None,
        }
    }
}

/// What the proxy did, by fate.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) connections: AtomicU64,
    pub(crate) dropped_after_forward: AtomicU64,
    pub(crate) reset: AtomicU64,
    pub(crate) delayed: AtomicU64,
    pub(crate) cut_at_lifetime: AtomicU64,
    pub(crate) upstream_down: AtomicU64,
}

impl Tally {
    pub(crate) fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy)]
enum Fate {
    Pass,
    DropAfterForward,
    Reset,
    Delay(Duration),
}

/// A running proxy. It stops when dropped.
pub(crate) struct ChaosProxy {
    addr: SocketAddr,
    upstream: Arc<Mutex<SocketAddr>>,
    tally: Arc<Tally>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl ChaosProxy {
    /// Listens on 127.0.0.1 (a port the OS picks) and forwards to `upstream`, on a thread and
    /// runtime of its own, so that the load it carries cannot starve it.
    pub(crate) fn start(upstream: SocketAddr, faults: Faults, seed: u64) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let upstream = Arc::new(Mutex::new(upstream));
        let tally = Arc::new(Tally::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let (to, t) = (upstream.clone(), tally.clone());
        std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = TcpListener::from_std(listener) else {
                    return;
                };
                tokio::select! {
                    _ = stopped => {}
                    () = accept(listener, to, t, faults, seed) => {}
                }
            });
        });
        Ok(ChaosProxy {
            addr,
            upstream,
            tally,
            _stop: stop,
        })
    }

    /// Where clients connect.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends new connections to `upstream` (a restarted server).
    #[allow(dead_code)]
    pub(crate) fn set_upstream(&self, upstream: SocketAddr) {
        *self.upstream.lock() = upstream;
    }

    /// What the proxy did so far.
    pub(crate) fn tally(&self) -> &Tally {
        &self.tally
    }
}

async fn accept(
    listener: TcpListener,
    to: Arc<Mutex<SocketAddr>>,
    t: Arc<Tally>,
    faults: Faults,
    seed: u64,
) {
    let mut rng = Rng(seed | 1);
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let _ = client.set_nodelay(true);
        t.connections.fetch_add(1, Ordering::Relaxed);
        let fate = rng.fate(&faults);
        let lifetime = faults
            .max_lifetime
            .map(|max| max.mul_f64(0.2 + 0.8 * rng.unit()));
        let cut = rng.unit();
        let (to, t) = (*to.lock(), t.clone());
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(to).await else {
                t.upstream_down.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let _ = server.set_nodelay(true);
            relay(client, server, fate, lifetime, cut, &t).await;
        });
    }
}

/// Carries one connection to its fate.
async fn relay(
    mut client: TcpStream,
    mut server: TcpStream,
    fate: Fate,
    lifetime: Option<Duration>,
    cut: f64,
    tally: &Tally,
) {
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let mut up = vec![0u8; 16 * 1024];
    let mut down = vec![0u8; 16 * 1024];
    let born = Instant::now();
    let end_of_life = lifetime.map(|l| born + l);
    // Drop after forward: once the client has sent, the answer is swallowed; once the server
    // has answered and gone quiet for this long, both sides close.
    let quiet = Duration::from_millis(20);
    let mut armed = false;
    let mut swallowed_at: Option<Instant> = None;
    let mut delayed = false;
    loop {
        let quiet_deadline = swallowed_at.map(|t| t + quiet);
        let stop_at = match (end_of_life, quiet_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sleep = async {
            match stop_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {
                if swallowed_at.is_some_and(|t| Instant::now() >= t + quiet) {
                    tally.dropped_after_forward.fetch_add(1, Ordering::Relaxed);
                } else {
                    tally.cut_at_lifetime.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            read = cr.read(&mut up) => {
                let Ok(n @ 1..) = read else {
                    let _ = sw.shutdown().await;
                    // Let the answer come back after the client's half-close.
                    let _ = copy_rest(&mut sr, &mut cw, matches!(fate, Fate::DropAfterForward)).await;
                    return;
                };
                if let Fate::Reset = fate {
                    // A part of the request, then RST on both sides.
                    let part = ((n as f64 * cut) as usize).clamp(1, n.max(2) - 1).min(n);
                    let _ = sw.write_all(&up[..part]).await;
                    tally.reset.fetch_add(1, Ordering::Relaxed);
                    let _ = client.set_zero_linger();
                    let _ = server.set_zero_linger();
                    return;
                }
                if sw.write_all(&up[..n]).await.is_err() {
                    return;
                }
                armed = true;
            }
            read = sr.read(&mut down) => {
                let Ok(n @ 1..) = read else {
                    let _ = cw.shutdown().await;
                    return;
                };
                match fate {
                    Fate::DropAfterForward if armed => {
                        swallowed_at = Some(Instant::now());
                        continue;
                    }
                    Fate::Delay(d) if armed && !delayed => {
                        delayed = true;
                        tally.delayed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(d).await;
                    }
                    _ => {}
                }
                if cw.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn copy_rest(
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    to: &mut tokio::net::tcp::WriteHalf<'_>,
    swallow: bool,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        if !swallow {
            to.write_all(&buf[..n]).await?;
        }
    }
}

/// xorshift64*: a seeded, reproducible choice of fates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn fate(&mut self, f: &Faults) -> Fate {
        let x = self.unit();
        if x < f.drop_after_forward {
            Fate::DropAfterForward
        } else if x < f.drop_after_forward + f.reset {
            Fate::Reset
        } else if x < f.drop_after_forward + f.reset + f.delay {
            Fate::Delay(f.max_delay.mul_f64(self.unit()))
        } else {
            Fate::Pass
        }
    }
}
