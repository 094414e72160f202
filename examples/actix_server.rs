//! The orders service behind the Actix-Web idempotency middleware.
//!
//! ```text
//! cargo run --example actix_server --features actix-integration
//! ADDR=127.0.0.1:8080 cargo run --example actix_server --features actix-integration
//! ```
//!
//! `POST /orders` with `{"symbol","quantity","price"}` answers `{"order_id","status","total"}`
//! with a fresh UUID. The scope comes from `X-User-ID`; the store is the one
//! `IDEMPOTENCY_STORE_URL` names (default `sqlite:idempotency.db`, in the working directory;
//! `postgres://...` with the `postgres` feature shares it between instances). Try it:
//!
//! ```text
//! curl -i -X POST localhost:3000/orders -H 'content-type: application/json' \
//!   -H 'x-user-id: alice' -H 'idempotency-key: 5b3c1f9e-8d2a-4c7b-9e1f-0a6d4b2c8e71' \
//!   -d '{"symbol":"AAPL","quantity":10,"price":150.5}'
//! ```
//!
//! Send it again: the same `order_id` comes back with `Idempotent-Replayed: true`, and the log
//! shows the order was created once.
//!
//! [`server`] is the whole service minus `main`'s setup; `tests/abuse.rs` runs it (and its
//! [`routes`] and [`idempotency`] middleware) on a real socket.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use actix_web::dev::Server;
use actix_web::{App, HttpResponse, HttpServer, web};
use idempotency_rs::Engine;
use idempotency_rs::actix_integration::{ClaimedKey, Idempotency};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct CreateOrder {
    symbol: String,
    quantity: u32,
    price: f64,
}

#[derive(Serialize)]
struct Order {
    order_id: String,
    status: &'static str,
    total: f64,
}

/// The service's state: the orders it has created, by id, with the idempotency key each was
/// created under (a stand-in for its own database).
#[derive(Default)]
pub(crate) struct Orders {
    created: AtomicUsize,
    placed: parking_lot::Mutex<Vec<(Option<String>, String)>>,
}

impl Orders {
    /// How many times the handler created an order (`tests/abuse.rs` counts runs with it).
    #[allow(dead_code)]
    pub(crate) fn created(&self) -> usize {
        self.created.load(Ordering::SeqCst)
    }

    /// Every order created: its key (if the request had one) and its id.
    #[allow(dead_code)]
    pub(crate) fn placed(&self) -> Vec<(Option<String>, String)> {
        self.placed.lock().clone()
    }
}

// `Option<ClaimedKey>`: the key the middleware deduplicated on (unquoted, lower-cased), its
// scope and the lease's fencing token; `None` for a request sent without a key.
async fn create_order(
    orders: web::Data<Orders>,
    claimed: Option<ClaimedKey>,
    req: web::Json<CreateOrder>,
) -> HttpResponse {
    orders.created.fetch_add(1, Ordering::SeqCst);
    let order = Order {
        order_id: uuid::Uuid::new_v4().to_string(),
        status: "created",
        total: f64::from(req.quantity) * req.price,
    };
    orders.placed.lock().push((
        claimed.as_ref().map(|c| c.key().as_str().to_owned()),
        order.order_id.clone(),
    ));
    tracing::info!(
        order_id = %order.order_id,
        symbol = %req.symbol,
        idempotency_key = claimed.as_ref().map(|c| c.key().as_str()),
        fencing_token = claimed.as_ref().map(ClaimedKey::fencing_token),
        "order created"
    );
    HttpResponse::Created().json(order)
}

/// The idempotency middleware: scope from `X-User-ID`, everything else the defaults (UUID
/// keys, optional; POST and PATCH; 1 MiB request and response limits).
pub(crate) fn idempotency(store: impl Into<Engine>) -> Idempotency {
    Idempotency::new(store).scope_header("X-User-ID")
}

/// The routes (they need `web::Data<Orders>` in the app).
pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/orders", web::post().to(create_order));
}

/// The service, listening on `addr` (every address it resolves to, each logged): await the
/// returned `Server` until it stops. Also returns the bound addresses. Call it inside an
/// Actix system.
pub(crate) fn server(
    store: impl Into<Engine>,
    orders: web::Data<Orders>,
    addr: &str,
) -> std::io::Result<(Server, Vec<SocketAddr>)> {
    let idempotency = idempotency(store);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(orders.clone())
            .wrap(idempotency.clone())
            .configure(routes)
    })
    // A client that hangs up drops its request, which releases the key at once.
    .h1_allow_half_closed(false)
    .bind(addr)?;
    let addrs = server.addrs();
    for a in &addrs {
        tracing::info!("listening on http://{a}");
    }
    Ok((server.run(), addrs))
}

// pub(crate): tests/signals.rs runs it in a child process, and stops it with a signal.
#[actix_web::main]
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

    let url =
        std::env::var("IDEMPOTENCY_STORE_URL").unwrap_or_else(|_| "sqlite:idempotency.db".into());
    let engine = Engine::open_url(&url).await?;
    // The URL's host and database, never its password.
    tracing::info!(store = url.rsplit('@').next(), "idempotency store open");
    let (server, _addrs) = server(&engine, web::Data::new(Orders::default()), &addr)?;
    // Actix-Web stops on its own signals: SIGTERM (what systemd, Docker and Kubernetes send)
    // gracefully, letting requests in progress finish; Ctrl-C (SIGINT) and SIGQUIT at once,
    // which drops them (and so releases their keys).
    server.await?;
    // Commit, flush and close the store.
    engine.shutdown()?;
    tracing::info!("stopped");
    Ok(())
}
