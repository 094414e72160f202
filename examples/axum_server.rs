//! The orders service behind the idempotency layer.
//!
//! ```text
//! cargo run --example axum_server --features axum-integration
//! ADDR=127.0.0.1:8080 cargo run --example axum_server --features axum-integration
//! ```
//!
//! `POST /orders` with `{"symbol","quantity","price"}` answers `{"order_id","status","total"}`
//! with a fresh UUID. The scope comes from `X-User-ID`; the store is `idempotency.db` in the
//! working directory.

use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use idempotency_rs::SqliteIdempotencyStore;
use idempotency_rs::axum_integration::idempotency_layer;
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

async fn create_order(Json(req): Json<CreateOrder>) -> (StatusCode, Json<Order>) {
    let order = Order {
        order_id: uuid::Uuid::new_v4().to_string(),
        status: "created",
        total: f64::from(req.quantity) * req.price,
    };
    tracing::info!(order_id = %order.order_id, symbol = %req.symbol, "order created");
    (StatusCode::CREATED, Json(order))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
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

    let store = SqliteIdempotencyStore::new("sqlite:idempotency.db").await?;
    let app = Router::new()
        .route("/orders", post(create_order))
        .layer(idempotency_layer(&store).scope_header("X-User-ID"));

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    store.engine().shutdown()?;
    Ok(())
}
