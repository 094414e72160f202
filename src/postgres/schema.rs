//! The PostgreSQL schema: names, creation, versions, and the checks that the table is ours.

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use crate::error::{Error, Result};

/// The schema version this build writes (the `schema_version` row of `<table>_meta`).
///
/// * 1: `<table>` keyed by the record id (`bytea` primary key), `<table>_fence` the sequence of
///   fencing tokens, `<table>_meta` the version.
pub(crate) const SCHEMA_VERSION: i64 = 1;

/// The quoted names of everything the store owns, derived from the configured table name.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    /// As configured (`records` or `schema.records`), for messages.
    pub(crate) shown: String,
    pub(crate) schema: Option<String>,
    pub(crate) records: String,
    pub(crate) meta: String,
    pub(crate) fence: String,
    /// The expiry index, unqualified (an index lives in its table's schema).
    pub(crate) expiry_index: String,
    /// The `pg_advisory_xact_lock` keys of the migration and of the cleanup.
    pub(crate) migrate_lock: i64,
    pub(crate) cleanup_lock: i64,
    /// Taken to create the schema (tables of one schema share it).
    pub(crate) schema_lock: i64,
}

impl Names {
    /// `table` is `name` or `schema.name`: lower-case letters, digits and `_`, not starting
    /// with a digit (an unquoted SQL identifier, as it is stored), at most 50 characters.
    pub(crate) fn new(table: &str) -> Result<Names> {
        let bad = |why: &str| {
            Err(Error::InvalidConfig {
                reason: format!("table name `{table}`: {why}"),
            })
        };
        let (schema, name) = match table.split_once('.') {
            Some((s, n)) => (Some(s), n),
            None => (None, table),
        };
        for part in schema.iter().chain(std::iter::once(&name)) {
            let ok = !part.is_empty()
                && part.len() <= 50
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                && !part.as_bytes()[0].is_ascii_digit();
            if !ok {
                return bad(
                    "use `name` or `schema.name`, each 1 to 50 lower-case letters, digits or `_`, not starting with a digit",
                );
            }
        }
        let qualify = |n: &str| match schema {
            Some(s) => format!("\"{s}\".\"{n}\""),
            None => format!("\"{n}\""),
        };
        // An advisory lock's key: the first 8 bytes of a hash of what it guards.
        let key = |what: &str, of: &str| {
            let digest = Sha256::digest(format!("idempotency-rs {what} {of}").as_bytes());
            i64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8]))
        };
        Ok(Names {
            shown: table.to_owned(),
            schema: schema.map(str::to_owned),
            records: qualify(name),
            meta: qualify(&format!("{name}_meta")),
            fence: qualify(&format!("{name}_fence")),
            expiry_index: format!("\"{name}_expiry\""),
            migrate_lock: key("migrate", table),
            cleanup_lock: key("cleanup", table),
            schema_lock: key("schema", schema.unwrap_or_default()),
        })
    }
}

/// Creates or checks the schema, in one transaction under a transaction-level advisory lock
/// (ten instances starting at once create it once; the lock is released at the commit, so
/// nothing stays held in a PgBouncer transaction-mode session). The fast path (the schema is
/// there at this version) writes nothing and needs no privilege beyond the grants the README
/// lists.
pub(crate) async fn migrate(
    client: &Client,
    names: &Names,
) -> Result<Result<()>, tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    let result = migrate_in_transaction(client, names).await;
    match &result {
        Ok(Ok(())) => client.batch_execute("COMMIT").await?,
        _ => {
            let _ = client.batch_execute("ROLLBACK").await;
        }
    }
    result
}

/// The checks and DDL; `Ok(Err(..))` is a refusal of ours (a foreign table, a newer schema).
async fn migrate_in_transaction(
    client: &Client,
    names: &Names,
) -> Result<Result<()>, tokio_postgres::Error> {
    client
        .query_typed(
            "SELECT pg_advisory_xact_lock($1)",
            &[(&names.migrate_lock, tokio_postgres::types::Type::INT8)],
        )
        .await?;
    // Unnamed statements only (`query_typed`), here as on the hot path: nothing prepared
    // outlives its statement, which PgBouncer's transaction mode needs.
    let rows = client
        .query_typed(
            &format!(
                "SELECT current_setting('transaction_read_only'),
                        to_regclass('{}') IS NOT NULL, to_regclass('{}') IS NOT NULL",
                names.records.replace('\'', "''"),
                names.meta.replace('\'', "''")
            ),
            &[],
        )
        .await?;
    let Some(row) = rows.first() else {
        return Ok(Err(Error::Corrupt {
            detail: "the schema check returned no row".into(),
        }));
    };
    let (read_only, records, meta): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
    let refused = |detail: String| Ok(Err(Error::Refused { detail }));
    if read_only == "on" {
        // Every claim writes: a store on a standby (or with default_transaction_read_only)
        // would fail every request. Said once, here, rather than on each of them.
        return refused(format!(
            "the server only accepts reads (a standby, or default_transaction_read_only=on), and the table {} needs writes: open the store on the primary",
            names.shown
        ));
    }
    match (records, meta) {
        (false, false) => {
            if let Some(schema) = &names.schema {
                // Two stores opening tables of one new schema at once would both create it
                // (IF NOT EXISTS is not safe against a concurrent CREATE): one at a time.
                client
                    .query_typed(
                        "SELECT pg_advisory_xact_lock($1)",
                        &[(&names.schema_lock, tokio_postgres::types::Type::INT8)],
                    )
                    .await?;
                client
                    .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
                    .await?;
            }
            client
                .batch_execute(&format!(
                    "CREATE TABLE {meta} (
                         name  text   PRIMARY KEY,
                         value bigint NOT NULL
                     );
                     CREATE SEQUENCE {fence} AS bigint;
                     CREATE TABLE {records} (
                         id           bytea    PRIMARY KEY,   -- SHA-256 of (scope, key)
                         scope        text     NOT NULL,
                         key          text     NOT NULL,
                         fingerprint  bytea    NOT NULL,      -- SHA-256 of the request
                         state        smallint NOT NULL,      -- 0 in flight, 1 completed
                         fence        bigint   NOT NULL,      -- fencing token of the lease
                         locked_until bigint   NOT NULL,      -- ms since the epoch, database clock
                         expires_at   bigint   NOT NULL,
                         created_at   bigint   NOT NULL,
                         completed_at bigint,
                         status       integer,
                         headers      bytea,                  -- postcard-encoded [(name, value)]
                         body         bytea,
                         trailers     bytea
                     );
                     CREATE INDEX {index} ON {records} (expires_at);
                     COMMENT ON TABLE {records} IS 'idempotency-rs records (see {meta_plain})';
                     INSERT INTO {meta} (name, value) VALUES ('schema_version', {SCHEMA_VERSION});",
                    meta = names.meta,
                    fence = names.fence,
                    records = names.records,
                    index = names.expiry_index,
                    meta_plain = names.meta.replace('"', ""),
                ))
                .await?;
            Ok(Ok(()))
        }
        (true, false) => refused(format!(
            "the table {} exists but was not created by idempotency-rs (it has no {} table): name another table in the configuration",
            names.shown,
            names.meta.replace('"', "")
        )),
        (_, true) => {
            let version = client
                .query_typed(
                    &format!(
                        "SELECT value FROM {} WHERE name = 'schema_version'",
                        names.meta
                    ),
                    &[],
                )
                .await;
            let version: i64 = match version {
                Ok(rows) => match rows.first().map(|row| row.try_get(0)) {
                    Some(Ok(v)) => v,
                    _ => return refused(not_ours(names)),
                },
                Err(e) if e.code().is_some_and(|c| c.code().starts_with("42")) => {
                    // A missing column or a wrong type: not our meta table. (A permission
                    // error is 42501: reported as such.)
                    if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
                        return Err(e);
                    }
                    return refused(not_ours(names));
                }
                Err(e) => return Err(e),
            };
            if version > SCHEMA_VERSION {
                return Ok(Err(Error::SchemaTooNew {
                    found: version,
                    supported: SCHEMA_VERSION,
                }));
            }
            if version < 1 || !records {
                return refused(not_ours(names));
            }
            // Every column we read and write, and the sequence: a table of the same name with
            // other columns is not ours.
            let check = client
                .batch_execute(&format!(
                    "SELECT id, scope, key, fingerprint, state, fence, locked_until, expires_at,
                            created_at, completed_at, status, headers, body, trailers
                     FROM {} LIMIT 0;
                     DO $$ BEGIN
                         IF to_regclass('{}') IS NULL THEN
                             RAISE EXCEPTION USING ERRCODE = '42P01', MESSAGE = 'no sequence';
                         END IF;
                     END $$",
                    names.records,
                    names.fence.replace('\'', "''")
                ))
                .await;
            match check {
                Ok(()) => Ok(Ok(())),
                Err(e)
                    if e.code().is_some_and(|c| {
                        c.code().starts_with("42")
                            && *c != tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE
                    }) =>
                {
                    refused(not_ours(names))
                }
                Err(e) => Err(e),
            }
        }
    }
}

fn not_ours(names: &Names) -> String {
    format!(
        "the table {} (or {}) exists but does not have idempotency-rs's layout: name another table in the configuration",
        names.shown,
        names.meta.replace('"', "")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        let n = Names::new("payments.idempotency").unwrap();
        assert_eq!(n.records, "\"payments\".\"idempotency\"");
        assert_eq!(n.meta, "\"payments\".\"idempotency_meta\"");
        assert_eq!(n.fence, "\"payments\".\"idempotency_fence\"");
        assert_ne!(n.migrate_lock, n.cleanup_lock);
        assert_eq!(Names::new("records").unwrap().records, "\"records\"");
        for bad in ["", "a.b.c", "Records", "1x", "a;drop", "x\"y", "s."] {
            assert!(Names::new(bad).is_err(), "{bad}");
        }
    }
}
