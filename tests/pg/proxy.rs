//! A TCP proxy in front of the test server that can cut every connection at once, refuse
//! connections for a while, or give up on every connection the way PgBouncer does (a `FATAL
//! 08P01` to the client, the server side closed while the server still holds what it was sent):
//! what an engine sees when its connections are reset, when the server restarts, or when a
//! pooler times a query out. Cuts land wherever the traffic is, including between a `COMMIT`
//! sent and its answer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

enum Upstream {
    Tcp(String),
    Unix(String),
}

pub struct Proxy {
    pub port: u16,
    cut: watch::Sender<u64>,
    give_up: watch::Sender<u64>,
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
        let (give_up, give_ups) = watch::channel(0u64);
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
                    let (mut cuts, mut give_ups) = (cuts.clone(), give_ups.clone());
                    cuts.borrow_and_update();
                    give_ups.borrow_and_update();
                    tokio::spawn(async move {
                        match &*upstream {
                            Upstream::Tcp(a) => {
                                if let Ok(server) = TcpStream::connect(a).await {
                                    serve(client, server, cuts, give_ups).await;
                                }
                            }
                            Upstream::Unix(p) => {
                                if let Ok(server) = tokio::net::UnixStream::connect(p).await {
                                    serve(client, server, cuts, give_ups).await;
                                }
                            }
                        }
                    });
                }
            });
        });
        let addr: SocketAddr = rx.recv().unwrap();
        Proxy {
            port: addr.port(),
            cut,
            give_up,
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

    /// Gives up on every connection as PgBouncer's `query_timeout` does: the client gets
    /// `FATAL 08P01` and is closed, the server side is closed, and the server carries on with
    /// whatever it was already sent.
    pub fn give_up_all(&self) {
        self.give_up.send_modify(|n| *n += 1);
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

/// Relays one client connection to `server` until either side closes, the connections are cut,
/// or the proxy gives up (then the client gets PgBouncer's `FATAL 08P01`).
async fn serve<S>(
    client: TcpStream,
    server: S,
    mut cuts: watch::Receiver<u64>,
    mut give_ups: watch::Receiver<u64>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = tokio::io::split(server);
    let gave_up = tokio::select! {
        _ = tokio::io::copy(&mut cr, &mut sw) => false,
        _ = tokio::io::copy(&mut sr, &mut cw) => false,
        _ = cuts.changed() => false,
        _ = give_ups.changed() => true,
    };
    if gave_up {
        // ErrorResponse: severity FATAL, SQLSTATE 08P01, message query_timeout.
        let mut body = Vec::new();
        for (field, value) in [
            (b'S', "FATAL"),
            (b'V', "FATAL"),
            (b'C', "08P01"),
            (b'M', "query_timeout"),
        ] {
            body.push(field);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut message = vec![b'E'];
        message.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        message.extend_from_slice(&body);
        let _ = cw.write_all(&message).await;
        let _ = cw.shutdown().await;
    }
}
