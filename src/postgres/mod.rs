//! The PostgreSQL store: several instances on one database. Its URL and TLS (`connect.rs`),
//! its schema (`schema.rs`) and the [`Backend`](crate::writer::Backend) the writer drives
//! (`backend.rs`). What is decided, in which order, and what every caller is told stays the
//! writer's and the engine's, shared with SQLite.

pub(crate) mod admin;
mod backend;
mod connect;
mod readers;
mod schema;

use std::sync::Arc;
use std::time::Duration;

pub(crate) use backend::PgBackend;
use backend::{Link, within};
pub(crate) use readers::{Found, Readers};

use crate::config::{Durability, EngineConfig};
use crate::error::{Error, Result};
use connect::{Target, pg_error};
use schema::Names;

/// Checks a `postgres://` URL without connecting.
pub(crate) fn check_url(url: &str) -> Result<()> {
    Target::parse(url).map(|_| ())
}

/// Connects, creates or checks the schema, and returns the writer's backend and the read
/// connections (`EngineConfig::read_connections` of them; none for 0).
///
/// On a thread of its own: the backend's runtime must not be started (or dropped, when the
/// open fails) on a thread that runs an async executor, which `Engine::open` may be called
/// from.
pub(crate) fn open(config: &EngineConfig, url: &str) -> Result<(PgBackend, Option<Readers>)> {
    let (config, url) = (config.clone(), url.to_owned());
    std::thread::Builder::new()
        .name("idempotency-open".into())
        .spawn(move || open_here(&config, &url))
        .map_err(|e| Error::Storage(Arc::new(e)))?
        .join()
        .map_err(|_| Error::Storage(Arc::new(std::io::Error::other("the open panicked"))))?
}

/// A first connection to the server, with the runtime that drives it: where every opener
/// (the engine's, an operator's reader) starts.
pub(crate) struct Connected {
    pub(crate) names: Names,
    pub(crate) target: Target,
    pub(crate) connector: tokio_postgres_rustls::MakeRustlsConnect,
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) client: tokio_postgres::Client,
    /// How long one exchange may take: the statement timeout, and a second for the network.
    pub(crate) deadline: Duration,
}

/// Checks the table name and URL, and connects (on the calling thread's new runtime).
pub(crate) fn connect(config: &EngineConfig, url: &str) -> Result<Connected> {
    let settings = &config.postgres;
    let names = Names::new(&settings.table)?;
    let mut target = Target::parse(url)?;
    target.set_connect_timeout(settings.statement_timeout);
    let connector = target.connector()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Storage(Arc::new(e)))?;
    let deadline = settings.statement_timeout + Duration::from_secs(1);
    let client = within(&rt, deadline, backend::connect(&target, &connector))
        .map_err(|_| Error::Unavailable {
            detail: format!("{}: no connection within {deadline:?}", target.shown),
        })?
        .map_err(|e| pg_error(e, &target.shown))?;
    Ok(Connected {
        names,
        target,
        connector,
        rt,
        client,
        deadline,
    })
}

fn open_here(config: &EngineConfig, url: &str) -> Result<(PgBackend, Option<Readers>)> {
    let settings = &config.postgres;
    let Connected {
        names,
        target,
        connector,
        rt,
        client,
        deadline,
    } = connect(config, url)?;
    // The server's encoding must hold every scope and key (UTF-8 text): on a LATIN1 database a
    // scope outside it would fail, and with it every other command of its batch. And with
    // `Durability::Full` a completion is acknowledged only once its commit is on disk, whatever
    // the server's default `synchronous_commit` is.
    let settings_row = within(
        &rt,
        deadline,
        client.query_typed(
            "SELECT current_setting('server_encoding'), current_setting('synchronous_commit')",
            &[],
        ),
    )
    .map_err(|_| Error::Unavailable {
        detail: format!("{}: no answer within {deadline:?}", target.shown),
    })?
    .map_err(|e| pg_error(e, &target.shown))?;
    let (encoding, synchronous): (String, String) = settings_row
        .first()
        .map(|r| (r.get(0), r.get(1)))
        .unwrap_or_default();
    if !matches!(encoding.as_str(), "UTF8" | "SQL_ASCII") {
        return Err(Error::Refused {
            detail: format!(
                "{}: the database's encoding is {encoding}; the store needs UTF8 (scopes and keys are UTF-8 text)",
                target.shown
            ),
        });
    }
    let synchronous_commit = match config.durability {
        Durability::Full if synchronous == "off" => Some("on"),
        Durability::Full => None,
        Durability::Normal => Some("off"),
    };
    // Other instances may be migrating: wait for their advisory lock longer than for a batch.
    let migration = deadline.max(Duration::from_secs(30));
    within(&rt, migration, schema::migrate(&client, &names))
        .map_err(|_| Error::Unavailable {
            detail: format!(
                "{}: creating or checking the table {} took longer than {migration:?}",
                target.shown, names.shown
            ),
        })?
        .map_err(|e| pg_error(e, &target.shown))??;
    let readers = match config.read_connections {
        0 => None,
        n => Some(Readers::spawn(
            n,
            readers::Setup {
                target: target.clone(),
                connector: connector.clone(),
                names: names.clone(),
                statement_timeout: settings.statement_timeout,
                clock: config.clock.clone(),
                db_clock: settings.database_clock.clone(),
            },
        )?),
    };
    let backend = PgBackend::new(
        Link::new(
            Some(client),
            rt,
            target,
            connector,
            settings.statement_timeout,
        ),
        names,
        settings.statement_timeout,
        synchronous_commit,
        config.clock.clone(),
        settings.database_clock.clone(),
    );
    Ok((backend, readers))
}
