//! Running one test on both stores (`mod stores;`): `on_both_stores! { ... }` expands each
//! `async fn` test twice, as `sqlite::name` and, with the `postgres` feature, `postgres::name`;
//! inside, [`on_postgres`] says which one is running, and the file's own helpers open their
//! engine accordingly. The tests are written once.
#![allow(dead_code, unreachable_pub)]

#[cfg(feature = "postgres")]
#[path = "../pg/mod.rs"]
pub mod pg;

tokio::task_local! {
    /// Set by `on_both_stores!`.
    pub static ON_POSTGRES: bool;
}

/// Whether the running test is the PostgreSQL expansion.
pub fn on_postgres() -> bool {
    ON_POSTGRES.try_with(|on| *on).unwrap_or(false)
}

/// An engine on the running test's store: in-memory SQLite, or a fresh table of the test
/// PostgreSQL server.
pub fn engine() -> idempotency_rs::Engine {
    #[cfg(feature = "postgres")]
    if on_postgres() {
        return idempotency_rs::Engine::open(pg::config()).unwrap();
    }
    idempotency_rs::Engine::open(idempotency_rs::EngineConfig::in_memory()).unwrap()
}

/// Expands each `async fn` test twice (see the module docs).
#[macro_export]
macro_rules! on_both_stores {
    ($($(#[$attr:meta])* async fn $name:ident() $body:block)*) => {
        mod sqlite {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(#[$attr])*
                async fn $name() {
                    $crate::stores::ON_POSTGRES.scope(false, async move $body).await
                }
            )*
        }
        #[cfg(feature = "postgres")]
        mod postgres {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(#[$attr])*
                async fn $name() {
                    $crate::stores::ON_POSTGRES.scope(true, async move $body).await
                }
            )*
        }
    };
}
