//! Places an order with the orders service of `axum_server` (or `actix_server`) through the
//! retrying client: one `Idempotency-Key` for the operation, kept across every retry.
//!
//! ```text
//! cargo run --example axum_server --features axum-integration        # in one terminal
//! cargo run --example order_client --features client                 # in another
//! cargo run --example order_client --features client -- --key <the key it printed>
//! ```
//!
//! The first run places an order and prints its key; the second, with that key, gets the same
//! order back as a replay (the server does not place it again). `--url` names another server
//! (default `http://127.0.0.1:3000`), `--user` the `X-User-ID` scope (default `alice`).
//!
//! When the attempts run out (stop the server and try), it prints the key to retry with: the
//! operation may or may not have run, and only a retry with the same key is safe.

use idempotency_rs::client::{ClientError, ResponseExt, RetryMiddleware};

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "idempotency_rs=info".into()),
        )
        .init();
    let url = arg("--url").unwrap_or_else(|| "http://127.0.0.1:3000".into());
    let user = arg("--user").unwrap_or_else(|| "alice".into());

    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RetryMiddleware::new())
        .build();
    let mut request = client
        .post(format!("{url}/orders"))
        .header("x-user-id", user)
        .header("content-type", "application/json")
        .body(r#"{"symbol":"AAPL","quantity":10,"price":150.5}"#);
    // A key of our own (one we stored before sending, or the one a failed run printed) wins
    // over a generated one.
    if let Some(key) = arg("--key") {
        request = request.header("idempotency-key", key);
    }
    match request.send().await {
        Ok(response) => {
            let delivery = response.delivery().cloned();
            let status = response.status();
            println!("{status} {}", response.text().await?);
            if let Some(d) = delivery {
                println!(
                    "key {}, {} attempt(s), replayed: {}",
                    d.key, d.attempts, d.replayed
                );
            }
            Ok(())
        }
        Err(e) => {
            match ClientError::of(&e) {
                Some(error @ ClientError::Rejected { .. }) => {
                    println!("refused: {error}");
                }
                Some(error) => {
                    println!("{error}");
                    println!("retry with: --key {}", error.key());
                }
                None => println!("{e}"),
            }
            std::process::exit(1);
        }
    }
}
