//! The orders service behind the idempotency layer.
//!
//! ```text
//! cargo run --example axum_server --features axum-integration
//! ADDR=127.0.0.1:8080 cargo run --example axum_server --features axum-integration
//! IDEMPOTENCY_STORE_URL=postgres://postgres@127.0.0.1/test \
//!     cargo run --example axum_server --features axum-integration,postgres
//! cargo run --example axum_server --features axum-integration,metrics   # and GET /metrics
//! ```
//!
//! `POST /orders` with `{"symbol","quantity","price"}` answers `{"order_id","status","total"}`
//! with a fresh UUID. The scope comes from `X-User-ID`.
//!
//! With the `metrics` feature, `GET /metrics` answers the engine's meters in Prometheus text
//! (the crate docs, *Metrics*, list them).
//!
//! The store is the one `IDEMPOTENCY_STORE_URL` names (default `sqlite:idempotency.db`, a file
//! in the working directory); `postgres://user@host/db` shares it between instances (build with
//! the `postgres` feature).
//!
//! [`app`] is the whole service minus the listener; `tests/abuse.rs` runs it (and its
//! [`routes`] and [`layer`]) on a real socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use idempotency_rs::Engine;
use idempotency_rs::axum_integration::{ClaimedKey, IdempotencyLayer, idempotency_layer};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct CreateOrder {
    symbol: String,
    quantity: u32,
    price: f64,
}

#[derive(Serialize, Clone)]
struct Order {
    order_id: String,
    status: &'static str,
    total: f64,
}

/// The service's own database, in miniature: the orders it created, each with the scope and
/// idempotency key it was created under, optionally appended to a file (one JSON object per
/// line) that a restarted process reads back.
///
/// Keeping the key with the order is what closes the one window an idempotency layer cannot
/// close from outside the service's database: a crash after the order is written and before
/// its response is stored. The lease of that key then expires, a retry runs the handler again,
/// and the handler finds the order under its scope and key instead of placing a second one.
#[derive(Default)]
pub(crate) struct Orders {
    by_key: parking_lot::Mutex<std::collections::HashMap<(String, String), Order>>,
    placed: parking_lot::Mutex<Vec<(Option<String>, String)>>,
    ledger: Option<parking_lot::Mutex<std::fs::File>>,
    created: AtomicUsize,
    recovered: AtomicUsize,
}

/// One line of the ledger.
#[derive(Serialize, Deserialize)]
struct Placed {
    scope: String,
    key: String,
    order_id: String,
    total: f64,
}

impl Orders {
    /// Orders kept in `path` too (created if missing; the orders already there are loaded).
    #[allow(dead_code)]
    pub(crate) fn with_ledger(path: &std::path::Path) -> std::io::Result<Orders> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let orders = Orders::default();
        // Only the last line can be cut short, by a crash in the middle of its write: that
        // order was never answered, and its retry places it again. Any other line that does
        // not read is a ledger this program did not write: refused, never skipped.
        let whole = text.ends_with('\n');
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_str::<Placed>(line) {
                Ok(p) => {
                    let order = Order {
                        order_id: p.order_id,
                        status: "created",
                        total: p.total,
                    };
                    orders.by_key.lock().insert((p.scope, p.key), order);
                }
                Err(_) if i + 1 == lines.len() && !whole => {}
                Err(e) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: line {} is not an order: {e}", path.display(), i + 1),
                    ));
                }
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        if !whole {
            // Drop the torn line, so that the next order starts a line of its own.
            let kept = text.rfind('\n').map_or(0, |at| at + 1);
            file.set_len(kept as u64)?;
        }
        Ok(Orders {
            ledger: Some(parking_lot::Mutex::new(file)),
            ..orders
        })
    }

    /// How many times the handler created an order (`tests/abuse.rs` counts runs with it).
    #[allow(dead_code)]
    pub(crate) fn created(&self) -> usize {
        self.created.load(Ordering::SeqCst)
    }

    /// How many runs found their key's order already placed (only after a crash).
    #[allow(dead_code)]
    pub(crate) fn recovered(&self) -> usize {
        self.recovered.load(Ordering::SeqCst)
    }

    /// Every order this process created: its key (if the request had one) and its id.
    #[allow(dead_code)]
    pub(crate) fn placed(&self) -> Vec<(Option<String>, String)> {
        self.placed.lock().clone()
    }

    /// Places an order, or, when the claimed scope and key already have one, answers that one.
    fn place(&self, claimed: Option<&ClaimedKey>, total: f64) -> std::io::Result<Order> {
        let id = claimed.map(|c| (c.scope().to_owned(), c.key().as_str().to_owned()));
        let mut by_key = self.by_key.lock();
        if let Some(order) = id.as_ref().and_then(|id| by_key.get(id)) {
            self.recovered.fetch_add(1, Ordering::SeqCst);
            return Ok(order.clone());
        }
        let order = Order {
            order_id: uuid::Uuid::new_v4().to_string(),
            status: "created",
            total,
        };
        if let (Some((scope, key)), Some(ledger)) = (&id, &self.ledger) {
            use std::io::Write;
            let placed = Placed {
                scope: scope.clone(),
                key: key.clone(),
                order_id: order.order_id.clone(),
                total,
            };
            let mut line = serde_json::to_vec(&placed).map_err(std::io::Error::other)?;
            line.push(b'\n');
            // One write per order: whole in the file once it returns, even if the process is
            // killed the next instant.
            ledger.lock().write_all(&line)?;
        }
        self.created.fetch_add(1, Ordering::SeqCst);
        self.placed
            .lock()
            .push((id.as_ref().map(|(_, k)| k.clone()), order.order_id.clone()));
        if let Some(id) = id {
            by_key.insert(id, order.clone());
        }
        Ok(order)
    }
}

// `Option<ClaimedKey>`: the key the layer deduplicated on (unquoted, lower-cased), its scope
// and the lease's fencing token; `None` for a request sent without a key. The orders are kept
// under scope and key (see `Orders`); a real service would also pass the key on to its payment
// provider and tag its own writes with the token.
async fn create_order(
    State(orders): State<Arc<Orders>>,
    claimed: Option<ClaimedKey>,
    Json(req): Json<CreateOrder>,
) -> Result<(StatusCode, Json<Order>), StatusCode> {
    let total = f64::from(req.quantity) * req.price;
    if !total.is_finite() || req.price < 0.0 {
        // Nothing placed; a 422 releases the key, so the request can be fixed and resent.
        return Err(StatusCode::UNPROCESSABLE_ENTITY);
    }
    // A 500 releases the key: the retry places the order.
    let order = orders
        .place(claimed.as_ref(), total)
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    tracing::info!(
        order_id = %order.order_id,
        symbol = %req.symbol,
        idempotency_key = claimed.as_ref().map(|c| c.key().as_str()),
        fencing_token = claimed.as_ref().map(ClaimedKey::fencing_token),
        "order created"
    );
    Ok((StatusCode::CREATED, Json(order)))
}

/// The idempotency layer: scope from `X-User-ID`, everything else the defaults (UUID keys,
/// optional; POST and PATCH; 1 MiB request and response limits).
pub(crate) fn layer(store: impl Into<Engine>) -> IdempotencyLayer {
    idempotency_layer(store).scope_header("X-User-ID")
}

/// The routes, without the layer.
pub(crate) fn routes(orders: Arc<Orders>) -> Router {
    Router::new()
        .route("/orders", post(create_order))
        .with_state(orders)
}

/// The service: the routes behind the layer. `route_layer` wraps the routes and not the
/// fallback, so an unknown path is a plain 404 (`layer` would pass it through untouched too).
pub(crate) fn app(store: impl Into<Engine>, orders: Arc<Orders>) -> Router {
    routes(orders).route_layer(layer(store))
}

// pub(crate): tests/signals.rs runs it in a child process, and stops it with a signal.
#[tokio::main]
pub(crate) async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,idempotency_rs=debug".into()),
        )
        .init();
    let addr = std::env::args()
        .skip_while(|a| a != "--addr")
        .nth(1)
        .or_else(|| std::env::var("ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1:3000".into());

    // Before the engine opens: it registers its meters with the recorder installed then.
    #[cfg(feature = "metrics")]
    let prometheus = prometheus()?;
    let url =
        std::env::var("IDEMPOTENCY_STORE_URL").unwrap_or_else(|_| "sqlite:idempotency.db".into());
    let engine = Engine::open_url(&url).await?;
    // The URL's host and database, never its password.
    tracing::info!(store = url.rsplit('@').next(), "idempotency store open");
    let app = app(&engine, Arc::default());
    #[cfg(feature = "metrics")]
    let app = app.route(
        "/metrics",
        axum::routing::get(move || std::future::ready(prometheus.render())),
    );

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    // Requests in progress have finished: commit, flush and close the store.
    engine.shutdown()?;
    tracing::info!("stopped");
    Ok(())
}

/// Installs the Prometheus recorder: the engine's durations as histograms with buckets (in
/// seconds), batch sizes in powers of two. A task drains the histograms' samples into their
/// buckets every few seconds, so memory stays flat between scrapes.
#[cfg(feature = "metrics")]
fn prometheus() -> Result<metrics_exporter_prometheus::PrometheusHandle, Box<dyn std::error::Error>>
{
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full("idempotency_batch_size".into()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
        )?
        .install_recorder()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM, which systemd, Docker and Kubernetes send to stop a
/// service: either starts a graceful shutdown.
async fn shutdown_signal() {
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}
