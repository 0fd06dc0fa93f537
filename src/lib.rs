//! Weir: a streaming SQL database in one binary: a durable message queue and
//! incremental stream processing, spoken over the PostgreSQL wire protocol.
//!
//! # Life of a statement
//!
//! ## A `SELECT`
//! 1. `server::pgwire` receives a `Query` message (or `Parse`/`Bind`/`Execute`)
//!    on the connection's task and takes the connection's [`engine::Session`].
//! 2. [`sql::SqlParser::parse`] turns the text into sqlparser `Statement`s
//!    (PostgreSQL dialect, with `datafusion-pg-catalog`'s rewrites for client
//!    catalog queries); syntax errors become a [`types::WeirError`] with a
//!    position.
//! 3. [`engine::Session::prepare`] calls [`plan::classify`]; a query is
//!    planned by DataFusion into a `LogicalPlan` against the `weir.public`
//!    schema, whose tables are [`engine::WeirTable`] providers.
//! 4. [`engine::Session::execute`] runs the plan; each `WeirTable::scan`
//!    snapshots the table's [`state::ZSetState`] (Arrow batches) so readers
//!    never wait for writers.
//! 5. The [`engine::Output::Rows`] stream is encoded batch by batch into
//!    `DataRow`s by `arrow-pg`; an error mid-stream is mapped by
//!    [`plan::from_datafusion`] to its SQLSTATE.
//!
//! ## An `INSERT`, `UPDATE` or `DELETE`
//! 1. Steps 1–3 above; DataFusion plans the statement (checking names and
//!    types, inferring `$n` parameter types).
//! 2. `INSERT`: DataFusion runs the plan into the table's sink, which hands
//!    the rows to [`engine::TableStore::insert`]. `UPDATE`/`DELETE`: the
//!    engine takes the table's writer lock and runs a DataFusion `SELECT` of
//!    the affected rows (and new values), so any `WHERE` DataFusion plans
//!    works.
//! 3. Either way the result is one [`types::ChangeBatch`] (rows with ±1
//!    weights) passed to [`engine::TableStore::write`]: it is
//!    [`state::ZSetState::check`]ed (primary key, NOT NULL), encoded with
//!    [`format::ipc::encode_change`], appended to the table's [`queue::Log`]
//!    with `append_durable` (fsync, group commit), and only then applied to
//!    memory and acknowledged. On start, [`engine::Weir::open`] replays each
//!    log into memory.
//!
//! ## A message: publish → subscription → consumer
//! 1. `INSERT INTO orders (key, payload) VALUES (...)` of literals or `$n`
//!    parameters is recognised at prepare time as a plain publish (no
//!    DataFusion plan); `COPY orders FROM STDIN` and HTTP
//!    `POST /v1/topics/orders/messages` arrive at the same
//!    [`engine::Weir::publish`].
//! 2. [`queue::topic::Topic::publish`] picks each message's partition
//!    (crc32 of the key, or round robin), appends to that partition's
//!    [`queue::Log`] and syncs it (group commit), then wakes long-polling
//!    fetchers. Only now is the publish acknowledged.
//! 3. `FETCH 10 FROM SUBSCRIPTION billing WAIT '5s'` calls
//!    [`engine::Weir::fetch`], which asks [`queue::subscription::Subscription::fetch`]
//!    for messages: stream mode reads the consumer's partitions from its
//!    position; queue mode leases messages and durably records the delivery.
//!    With nothing to deliver it waits on the topic until a publish or the
//!    deadline.
//! 4. `ACK`/`COMMIT` append a durable state event to the subscription's own
//!    log; after a restart the subscription replays it and resumes there.
//!
//! `CREATE MATERIALIZED VIEW` and the broker → source → window → Parquet path
//! join this walk with the streaming runtime (`stream`) and connectors.

pub mod catalog;
pub mod connector;
pub mod engine;
pub mod format;
pub mod plan;
pub mod queue;
pub mod server;
pub mod sql;
pub mod state;
pub mod stream;
pub mod types;
