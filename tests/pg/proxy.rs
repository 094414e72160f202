//! A TCP proxy in front of the test server that can cut every connection at once, or refuse
//! connections for a while: what an engine sees when its connections are reset, or when the
//! server restarts. Cuts land wherever the traffic is, including between a `COMMIT` sent and
//! its answer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;

enum Upstream {
    Tcp(String),
    Unix(String),
}

pub struct Proxy {
    pub port: u16,
    cut: watch::Sender<u64>,
    down_until: Arc<Mutex<Option<Instant>>>,
    _thread: std::thread::JoinHandle<()>,
}

impl Proxy {
    /// A proxy to the test server (TCP or Unix socket, as its URL says).
    pub fn start() -> Proxy {
        let config: tokio_postgres::Config = super::url().parse().unwrap();
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let upstream = match &config.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => Upstream::Tcp(format!("{h}:{port}")),
            tokio_postgres::config::Host::Unix(dir) => {
                Upstream::Unix(format!("{}/.s.PGSQL.{port}", dir.display()))
            }
        };
        let upstream = Arc::new(upstream);
        let (cut, cuts) = watch::channel(0u64);
        let down_until: Arc<Mutex<Option<Instant>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let down = down_until.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    if down.lock().is_some_and(|t| Instant::now() < t) {
                        // "The database system is starting up": the connection just closes.
                        drop(client);
                        continue;
                    }
                    let upstream = upstream.clone();
                    let mut cuts = cuts.clone();
                    cuts.borrow_and_update();
                    tokio::spawn(async move {
                        let served = async {
                            match &*upstream {
                                Upstream::Tcp(a) => {
                                    if let Ok(server) = tokio::net::TcpStream::connect(a).await {
                                        pipe(client, server).await;
                                    }
                                }
                                Upstream::Unix(p) => {
                                    if let Ok(server) = tokio::net::UnixStream::connect(p).await {
                                        pipe(client, server).await;
                                    }
                                }
                            }
                        };
                        tokio::select! {
                            _ = served => {}
                            _ = cuts.changed() => {}
                        }
                    });
                }
            });
        });
        let addr: SocketAddr = rx.recv().unwrap();
        Proxy {
            port: addr.port(),
            cut,
            down_until,
            _thread: thread,
        }
    }

    /// The test server's URL, through this proxy.
    pub fn url(&self) -> String {
        let config: tokio_postgres::Config = super::url().parse().unwrap();
        format!(
            "postgres://{}@127.0.0.1:{}/{}?sslmode=disable",
            config.get_user().unwrap_or("postgres"),
            self.port,
            config.get_dbname().unwrap_or("test")
        )
    }

    /// Resets every connection now (both directions dropped mid-stream).
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// A restart: every connection reset, and new ones refused for `d`.
    pub fn down_for(&self, d: Duration) {
        *self.down_until.lock() = Some(Instant::now() + d);
        self.cut();
    }
}

async fn pipe<A, B>(a: A, b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    tokio::select! {
        _ = tokio::io::copy(&mut ar, &mut bw) => {}
        _ = tokio::io::copy(&mut br, &mut aw) => {}
    }
}
