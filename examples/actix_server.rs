//! The orders service behind the Actix-Web idempotency middleware.
//!
//! ```text
//! cargo run --example actix_server --features actix-integration
//! ADDR=127.0.0.1:8080 cargo run --example actix_server --features actix-integration
//! ```
//!
//! `POST /orders` with `{"symbol","quantity","price"}` answers `{"order_id","status","total"}`
//! with a fresh UUID. The scope comes from `X-User-ID`; the store is `idempotency.db` in the
//! working directory. Try it:
//!
//! ```text
//! curl -i -X POST localhost:3000/orders -H 'content-type: application/json' \
//!   -H 'x-user-id: alice' -H 'idempotency-key: 5b3c1f9e-8d2a-4c7b-9e1f-0a6d4b2c8e71' \
//!   -d '{"symbol":"AAPL","quantity":10,"price":150.5}'
//! ```
//!
//! Send it again: the same `order_id` comes back with `Idempotent-Replayed: true`, and the log
//! shows the order was created once.

use actix_web::{App, HttpResponse, HttpServer, web};
use idempotency_rs::SqliteIdempotencyStore;
use idempotency_rs::actix_integration::Idempotency;
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

async fn create_order(req: web::Json<CreateOrder>) -> HttpResponse {
    let order = Order {
        order_id: uuid::Uuid::new_v4().to_string(),
        status: "created",
        total: f64::from(req.quantity) * req.price,
    };
    tracing::info!(order_id = %order.order_id, symbol = %req.symbol, "order created");
    HttpResponse::Created().json(order)
}

#[actix_web::main]
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
    let idempotency = Idempotency::new(&store).scope_header("X-User-ID");
    let server = HttpServer::new(move || {
        App::new()
            .wrap(idempotency.clone())
            .route("/orders", web::post().to(create_order))
    })
    // A client that hangs up drops its request, which releases the key at once.
    .h1_allow_half_closed(false)
    .bind(&addr)?;
    for a in server.addrs() {
        tracing::info!("listening on http://{a}");
    }
    // Actix stops gracefully on Ctrl-C.
    server.run().await?;
    store.engine().shutdown()?;
    Ok(())
}
