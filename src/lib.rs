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
//! ## A `CREATE MATERIALIZED VIEW`
//! 1. [`sql::SqlParser::parse`] recognises the statement as Weir's own and keeps
//!    the query text as written, noting `EMIT ON WINDOW CLOSE`.
//! 2. The engine plans the query with DataFusion (`TUMBLE`/`HOP` are table
//!    functions returning a [`plan::window::WindowTable`]) and optimises it.
//! 3. [`plan::stream::compile`] walks the `LogicalPlan` and fills a
//!    [`stream::DataflowBuilder`]: each scan of a source becomes an input over a
//!    [`connector::builtin::TopicSource`] (a table: a
//!    [`connector::builtin::TableSource`]), a window scan adds a
//!    [`stream::WindowOperator`], projections and filters become
//!    [`stream::ProjectOperator`]/[`stream::FilterOperator`] over DataFusion
//!    `PhysicalExpr`s, and a `GROUP BY` an [`stream::AggregateOperator`] with
//!    DataFusion accumulators. A view read by the view is compiled inline.
//! 4. The [`stream::Dataflow`] starts on a thread of its own, backfills from the
//!    retained history and keeps the view's [`state::ZSetState`]; `SELECT`
//!    snapshots it.
//!
//! ## A message: topic → source → window → view
//! 1. `INSERT INTO bids VALUES (...)` encodes the rows as JSON (arrow-json) and
//!    publishes them to the source's topic, durably, like any publish.
//! 2. The view's [`connector::builtin::TopicSource`] reads the new messages and
//!    decodes them in one pass with [`format::decode::RowDecoder`]; a message that
//!    does not decode goes to the dead letters in [`stream::SourceStats`].
//! 3. The dataflow derives the watermark from the event times
//!    ([`stream::WatermarkSpec`]), drops and records rows behind it when the input
//!    feeds a window, and pushes the batch up the tree: window assignment, then
//!    the aggregate, which updates its groups and emits retractions and new rows
//!    (or, with `EMIT ON WINDOW CLOSE`, final rows when the watermark passes a
//!    window's end).
//! 4. The root applies the changes to the view's state; `FLUSH` returns once every
//!    view's inputs have reached the end offsets published before it.
//!
//! ## A checkpoint, a crash, and a sink
//! 1. Every `checkpoint_interval` (or on `CHECKPOINT`) a view's
//!    [`stream::Dataflow`] stops between two rounds — every operator has seen
//!    exactly the input up to its inputs' positions — and writes epoch *n*:
//!    positions and watermarks, each [`stream::Operator::snapshot`] (through
//!    [`state::SnapshotWriter`]), and the view's rows — or, while the chain may grow,
//!    only what changed ([`stream::Operator::snapshot_changes`], the view's net
//!    changes). A sink's root
//!    ([`connector::api::Sink::precommit`]) stages its output instead.
//! 2. [`state::CheckpointStore::commit`] syncs the state file and replaces the
//!    manifest atomically; then [`connector::api::Sink::commit`] makes the epoch's
//!    output visible: [`connector::parquet::ParquetSink`] renames its staged files,
//!    [`connector::builtin::TopicSink`] publishes the held messages.
//! 3. After `kill -9`, [`engine::Weir::open`] opens each view: the dataflow loads
//!    the manifest, seeks its inputs ([`connector::api::Source::seek`]), restores
//!    every operator and the view's rows before the view is registered, and reads
//!    only what followed the checkpoint. A sink's
//!    [`connector::api::Sink::restore`] commits the restored epoch again
//!    (idempotently) and drops what was staged after it.
//! 4. A RabbitMQ source's ingest appends deliveries to the source's own topic and
//!    acknowledges them once every reader's checkpoint covers them
//!    ([`connector::api::Source::committed`], [`connector::rabbitmq::AckGate`]), so
//!    RabbitMQ keeps what no checkpoint covers and replay after a crash reads Weir's log.

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
