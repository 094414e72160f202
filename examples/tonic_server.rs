//! An order service over gRPC whose `CreateOrder` is safe to retry.
//!
//! ```text
//! cargo run --example tonic_server --features tonic-integration
//! ```
//!
//! It listens on `127.0.0.1:50051` (set `TONIC_SERVER_ADDR` to change it; port 0 picks a free
//! one, which the log names) and keeps its idempotency records in `tonic_server.db` (set
//! `TONIC_SERVER_DB`). Ctrl-C or SIGTERM stops it cleanly. Call it with grpcurl, using
//! the proto file since the server has no reflection service:
//!
//! ```text
//! grpcurl -plaintext -import-path examples/proto -proto orders.proto \
//!   -H 'idempotency-key: 5b3c1f9e-8d2a-4c7b-9e1f-0a6d4b2c8e71' \
//!   -d '{"symbol": "AAPL", "quantity": 10, "price": "187.25"}' \
//!   127.0.0.1:50051 orders.Orders/CreateOrder
//! ```
//!
//! Run it again with the same key: the same order comes back (same `orderId`), the server log
//! shows the order was placed once, and `grpcurl -v` shows `idempotent-replayed: true`. Change
//! the message but keep the key and the call fails with `FailedPrecondition`.
//!
//! The protobuf code is generated once and committed (`examples/generated/orders.rs`), so no
//! protoc is needed; `tests/tonic_codegen.rs` checks it is up to date.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use idempotency_rs::Engine;
use idempotency_rs::tonic_integration::{ClaimedKey, IdempotencyLayer};
use parking_lot::Mutex;
use tonic::codegen::tokio_stream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

#[allow(unreachable_pub, missing_docs, clippy::all, clippy::pedantic)]
pub(crate) mod orders {
    include!("generated/orders.rs");
}

use orders::orders_server::{Orders, OrdersServer};
use orders::{CreateOrderRequest, Order, OrderUpdate, WatchOrderRequest};

/// The service's state: the orders placed, by id, with the idempotency key each was placed
/// under (a stand-in for its own database).
#[derive(Default)]
pub(crate) struct OrderBook {
    orders: Mutex<HashMap<String, Order>>,
    keys: Mutex<Vec<(Option<String>, String)>>,
}

impl OrderBook {
    /// Every order placed: its key and its id, in order.
    #[allow(dead_code)]
    pub(crate) fn placed(&self) -> Vec<(Option<String>, String)> {
        self.keys.lock().clone()
    }
}

#[tonic::async_trait]
impl Orders for OrderBook {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        // The key the layer deduplicated on (normalised) and the lease's fencing token.
        let claimed = request.extensions().get::<ClaimedKey>().cloned();
        let req = request.into_inner();
        if req.symbol.is_empty()
            || req.symbol.len() > 12
            || !req.symbol.bytes().all(|b| b.is_ascii_uppercase())
        {
            return Err(Status::invalid_argument(
                "symbol must be 1 to 12 upper-case letters, e.g. \"AAPL\"",
            ));
        }
        if req.quantity == 0 {
            return Err(Status::invalid_argument("quantity must be at least 1"));
        }
        if !valid_price(&req.price) {
            return Err(Status::invalid_argument(
                "price must be a positive decimal with at most two decimals, e.g. \"187.25\"",
            ));
        }
        let order = Order {
            order_id: uuid::Uuid::new_v4().to_string(),
            symbol: req.symbol,
            quantity: req.quantity,
            price: req.price,
            status: "accepted".into(),
        };
        tracing::info!(
            order_id = %order.order_id,
            symbol = %order.symbol,
            quantity = order.quantity,
            price = %order.price,
            idempotency_key = claimed.as_ref().map(|c| c.key().as_str()),
            fencing_token = claimed.as_ref().map(ClaimedKey::fencing_token),
            "order placed"
        );
        self.orders
            .lock()
            .insert(order.order_id.clone(), order.clone());
        self.keys.lock().push((
            claimed.map(|c| c.key().as_str().to_owned()),
            order.order_id.clone(),
        ));
        Ok(Response::new(order))
    }

    type WatchOrderStream = tokio_stream::Iter<std::vec::IntoIter<Result<OrderUpdate, Status>>>;

    async fn watch_order(
        &self,
        request: Request<WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let id = request.into_inner().order_id;
        if !self.orders.lock().contains_key(&id) {
            return Err(Status::not_found(format!("no order {id}")));
        }
        let updates = ["accepted", "routed", "filled"]
            .into_iter()
            .map(|status| {
                Ok(OrderUpdate {
                    order_id: id.clone(),
                    status: status.into(),
                })
            })
            .collect::<Vec<_>>();
        Ok(Response::new(tokio_stream::iter(updates)))
    }
}

/// The idempotency layer: `CreateOrder` covered, a key required.
pub(crate) fn layer(store: impl Into<Engine>) -> IdempotencyLayer {
    IdempotencyLayer::new(store)
        .method("/orders.Orders/CreateOrder")
        .require_key(true)
}

/// The service on `listener` behind `idempotency`, until `shutdown` resolves.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    idempotency: IdempotencyLayer,
    book: Arc<OrderBook>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .layer(idempotency)
        .add_service(OrdersServer::from_arc(book))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await
}

/// A positive decimal with at most two decimals.
fn valid_price(price: &str) -> bool {
    let (units, cents) = price.split_once('.').unwrap_or((price, ""));
    !units.is_empty()
        && units.bytes().all(|b| b.is_ascii_digit())
        && cents.len() <= 2
        && cents.bytes().all(|b| b.is_ascii_digit())
        && price.bytes().any(|b| (b'1'..=b'9').contains(&b))
}

// pub(crate): tests/signals.rs runs it in a child process, and stops it with a signal.
#[tokio::main]
pub(crate) async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let addr: SocketAddr = std::env::var("TONIC_SERVER_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:50051".into())
        .parse()?;
    // IDEMPOTENCY_STORE_URL names any store (`postgres://...` with the `postgres` feature);
    // TONIC_SERVER_DB, the SQLite file used when it is not set.
    let db = std::env::var("TONIC_SERVER_DB").unwrap_or_else(|_| "tonic_server.db".into());
    let url = std::env::var("IDEMPOTENCY_STORE_URL").unwrap_or_else(|_| format!("sqlite:{db}"));
    let engine = Engine::open_url(&url).await?;
    let db = url.rsplit('@').next().unwrap_or_default().to_owned();

    // Only CreateOrder is covered: WatchOrder streams, and passes through untouched. All callers
    // share one scope here; behind authentication, scope keys per caller with
    // `.scope_fn(|parts| parts.extensions.get::<Caller>().map(|c| c.id.clone()))` or
    // `.scope_metadata("x-tenant-id")`.
    let idempotency = layer(&engine);

    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, %db, "orders service listening");
    serve(listener, idempotency, Arc::default(), shutdown_signal()).await?;
    // Calls in progress have finished: commit, flush and close the store.
    engine.shutdown()?;
    tracing::info!("stopped");
    Ok(())
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
