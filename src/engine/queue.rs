//! Topics and subscriptions: Weir's statements for the built-in queue
//! (`CREATE TOPIC`, `CREATE SUBSCRIPTION`, `FETCH`, `ACK`, ...), topics as
//! tables (`INSERT INTO topic`, `SELECT * FROM topic`), and their recovery.
//!
//! The queue module does the storage and delivery bookkeeping; this file
//! turns options into configs, statements into calls (on the blocking pool:
//! they fsync), and results into rows.

use std::fmt;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use bytes::Bytes;
use datafusion::catalog::{Session as DfSession, TableProvider};
use datafusion::common::{DataFusionError, ParamValues, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::sink::{DataSink, DataSinkExec};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::logical_expr::dml::InsertOp;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan};
use datafusion::sql::sqlparser::ast;
use futures::StreamExt;

use super::session::Output;
use super::table::to_df;
use super::{Weir, log_error};
use crate::catalog::{Relation, RelationKind};
use crate::queue::subscription::{
    Delivery, StartPosition, Subscription, SubscriptionConfig, SubscriptionMode,
};
use crate::queue::topic::{Message, Published, QueueError, Topic, TopicConfig};
use crate::sql::{Options, SeekTarget, Statement, WeirStatement, parse_bytes, parse_duration_ms};
use crate::types::{SqlState, WeirError, WeirResult};

/// How many records one `FETCH` may return at most.
const FETCH_MAX: u64 = 10_000;
/// Longest `WAIT` a `FETCH` may ask for.
const FETCH_WAIT_MAX_MS: u64 = 300_000;

pub(crate) fn queue_error(e: QueueError) -> WeirError {
    match e {
        QueueError::Log(log) => log_error(log),
        QueueError::UnknownLease { lease_id } => WeirError::new(
            SqlState::UNDEFINED_OBJECT,
            format!("lease \"{lease_id}\" does not exist"),
        )
        .with_hint("ACK/NACK take lease ids returned by FETCH on the same subscription"),
        QueueError::LeaseExpired { lease_id } => WeirError::new(
            SqlState("55000"),
            format!("lease \"{lease_id}\" has expired; the message will be redelivered"),
        )
        .with_hint("ack within the subscription's ack_timeout, or raise it"),
        QueueError::MessageTooLarge { bytes, max } => WeirError::new(
            SqlState::PROGRAM_LIMIT_EXCEEDED,
            format!("message of {bytes} bytes exceeds the topic's limit of {max} bytes"),
        )
        .with_hint(
            "split the message, or raise the topic's message_bytes_max; nothing was published",
        ),
        QueueError::InvalidConfig(msg) => WeirError::new(SqlState::INVALID_PARAMETER_VALUE, msg),
        QueueError::WrongMode { .. } => WeirError::new(SqlState("55000"), e.to_string())
            .with_hint("stream subscriptions use COMMIT/SEEK; queue subscriptions use ACK/NACK"),
        QueueError::UnknownPartition { .. } => {
            WeirError::new(SqlState::INVALID_PARAMETER_VALUE, e.to_string())
        }
        other => WeirError::new(SqlState::DATA_CORRUPTED, other.to_string()),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, QueueError> + Send + 'static,
) -> WeirResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| WeirError::internal(format!("queue task failed: {e}")))?
        .map_err(queue_error)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn invalid_option(key: &str, valid: &[&str], what: &str) -> WeirError {
    WeirError::new(
        SqlState::INVALID_PARAMETER_VALUE,
        format!("unknown {what} option \"{key}\""),
    )
    .with_hint(format!("valid options: {}", valid.join(", ")))
}

fn number(key: &str, value: &str) -> WeirResult<u64> {
    value.trim().parse().map_err(|_| {
        WeirError::new(
            SqlState::INVALID_PARAMETER_VALUE,
            format!("option {key} must be a whole number, not \"{value}\""),
        )
    })
}

const TOPIC_OPTIONS: &[&str] = &[
    "partitions",
    "retention",
    "retention_bytes",
    "message_bytes_max",
];

fn topic_config(options: &Options) -> WeirResult<TopicConfig> {
    let mut config = TopicConfig::default();
    for (key, value) in options {
        match key.as_str() {
            "partitions" => {
                let n = number(key, value)?;
                if !(1..=1024).contains(&n) {
                    return Err(WeirError::new(
                        SqlState::INVALID_PARAMETER_VALUE,
                        format!("partitions must be between 1 and 1024, not {n}"),
                    ));
                }
                config.partitions = n as u32;
            }
            "retention" => config.retention_ms = Some(parse_duration_ms(value)?),
            "retention_bytes" => config.retention_bytes = Some(parse_bytes(value)?),
            "message_bytes_max" => config.message_bytes_max = parse_bytes(value)? as u32,
            other => return Err(invalid_option(other, TOPIC_OPTIONS, "topic")),
        }
    }
    Ok(config)
}

const SUBSCRIPTION_OPTIONS: &[&str] = &["mode", "start", "ack_timeout", "max_deliveries"];

fn subscription_config(options: &Options) -> WeirResult<SubscriptionConfig> {
    let mut config = SubscriptionConfig::default();
    for (key, value) in options {
        match key.as_str() {
            "mode" => {
                config.mode = match value.to_lowercase().as_str() {
                    "stream" => SubscriptionMode::Stream,
                    "queue" => SubscriptionMode::Queue,
                    other => {
                        return Err(WeirError::new(
                            SqlState::INVALID_PARAMETER_VALUE,
                            format!("mode must be 'stream' or 'queue', not '{other}'"),
                        ));
                    }
                }
            }
            "start" => config.start = start_position(value)?,
            "ack_timeout" => config.ack_timeout_ms = parse_duration_ms(value)?.max(1),
            "max_deliveries" => config.max_deliveries = number(key, value)?.clamp(1, 1_000) as u32,
            other => return Err(invalid_option(other, SUBSCRIPTION_OPTIONS, "subscription")),
        }
    }
    Ok(config)
}

fn start_position(value: &str) -> WeirResult<StartPosition> {
    match value.to_lowercase().as_str() {
        "earliest" => Ok(StartPosition::Earliest),
        "latest" => Ok(StartPosition::Latest),
        v if v.chars().all(|c| c.is_ascii_digit()) && !v.is_empty() => {
            Ok(StartPosition::Offset(number("start", v)?))
        }
        v => timestamp_ms(v).map(StartPosition::Timestamp),
    }
}

fn timestamp_ms(text: &str) -> WeirResult<i64> {
    let parsed = chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
                .map(|t| t.and_utc().timestamp_millis())
        });
    parsed.map_err(|_| {
        WeirError::new(
            SqlState::INVALID_DATETIME_FORMAT,
            format!("invalid start or seek position \"{text}\""),
        )
        .with_hint("use earliest, latest, an offset, or a timestamp like '2026-01-01 10:00:00'")
    })
}

fn reparse(weir: &Weir, relation: &Relation) -> WeirResult<WeirStatement> {
    match weir.inner.parser.parse(&relation.sql)?.pop() {
        Some(Statement::Weir(w)) => Ok(w),
        _ => Err(WeirError::internal(format!(
            "catalog definition of {} is not a Weir statement",
            relation.name
        ))),
    }
}

fn undefined(kind: &str, name: &str) -> WeirError {
    WeirError::new(
        SqlState::UNDEFINED_OBJECT,
        format!("{kind} \"{name}\" does not exist"),
    )
    .with_hint(format!("SHOW {}S lists them", kind.to_uppercase()))
}

impl Weir {
    /// The open topics, sorted by name.
    pub(super) fn open_topics(&self) -> Vec<(String, Arc<Topic>)> {
        let map = self.inner.topics.lock().unwrap_or_else(|p| p.into_inner());
        let mut topics: Vec<_> = map.iter().map(|(n, t)| (n.clone(), t.clone())).collect();
        topics.sort_by(|a, b| a.0.cmp(&b.0));
        topics
    }

    /// The open subscriptions, sorted by name.
    pub(super) fn open_subscriptions(&self) -> Vec<(String, Arc<Subscription>)> {
        let map = self
            .inner
            .subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut subs: Vec<_> = map.iter().map(|(n, s)| (n.clone(), s.clone())).collect();
        subs.sort_by(|a, b| a.0.cmp(&b.0));
        subs
    }

    /// Whether a topic of this name is open.
    pub(super) fn topic_exists(&self, name: &str) -> bool {
        self.inner
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
    }

    /// An open topic by name, 42704 if there is none.
    pub(super) fn topic_arc(&self, name: &str) -> WeirResult<Arc<Topic>> {
        self.topic(name)
    }

    fn topic(&self, name: &str) -> WeirResult<Arc<Topic>> {
        self.inner
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| undefined("topic", name))
    }

    fn subscription(&self, name: &str) -> WeirResult<Arc<Subscription>> {
        self.inner
            .subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| undefined("subscription", name))
    }
}

/// Opens a topic from its catalog entry and registers it as a table.
pub(super) async fn open_topic(weir: &Weir, relation: Relation) -> WeirResult<Arc<Topic>> {
    let WeirStatement::CreateTopic { options, .. } = reparse(weir, &relation)? else {
        return Err(WeirError::internal("topic definition is not CREATE TOPIC"));
    };
    let config = topic_config(&options)?;
    let dir = weir.storage_dir("topics", relation.id);
    let name = relation.name.clone();
    let topic = Arc::new(blocking(move || Ok(Topic::open(&dir, config)?.with_name(name))).await?);
    let provider = TopicTable {
        name: relation.name.clone(),
        topic: topic.clone(),
    };
    weir.inner
        .ctx
        .register_table(relation.name.as_str(), Arc::new(provider))
        .map_err(|e| WeirError::internal(format!("registering topic: {e}")))?;
    weir.inner
        .topics
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(relation.name.clone(), topic.clone());
    Ok(topic)
}

/// Opens a subscription from its catalog entry (its topic must be open).
pub(super) async fn open_subscription(weir: &Weir, relation: Relation) -> WeirResult<()> {
    let WeirStatement::CreateSubscription { topic, options, .. } = reparse(weir, &relation)? else {
        return Err(WeirError::internal(
            "subscription definition is not CREATE SUBSCRIPTION",
        ));
    };
    let config = subscription_config(&options)?;
    let topic = weir.topic(&topic)?;
    let dead_letter = match config.mode {
        SubscriptionMode::Queue => Some(ensure_dead_letter_topic(weir, &topic).await?),
        SubscriptionMode::Stream => None,
    };
    let dir = weir.storage_dir("subscriptions", relation.id);
    let subscription =
        blocking(move || Subscription::open(&dir, topic, config, dead_letter)).await?;
    weir.inner
        .subscriptions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(relation.name.clone(), Arc::new(subscription));
    Ok(())
}

/// The dead-letter topic of a queue subscription's topic: `<topic>_dlq`.
async fn ensure_dead_letter_topic(weir: &Weir, topic: &Topic) -> WeirResult<Arc<Topic>> {
    let topic_name = topic.name();
    let dlq = format!("{topic_name}_dlq");
    if let Ok(existing) = weir.topic(&dlq) {
        return Ok(existing);
    }
    let statement = WeirStatement::CreateTopic {
        name: dlq.clone(),
        if_not_exists: true,
        options: Vec::new(),
    };
    let relation = weir
        .inner
        .catalog
        .create(&dlq, RelationKind::Topic, statement.to_string())?;
    open_topic(weir, relation).await
}

/// Columns of rows that describe messages (`FETCH`, `SELECT * FROM topic`).
fn fetch_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("topic", DataType::Utf8, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new("key", DataType::Utf8, true),
        Field::new("payload", DataType::Utf8, false),
        Field::new("headers", DataType::Utf8, true),
        Field::new("delivery_count", DataType::Int32, false),
        Field::new("lease_id", DataType::Utf8, true),
    ]))
}

/// A topic's columns. The metadata columns are nullable only because an
/// `INSERT` leaves them out (the topic assigns them); they are never NULL.
fn topic_table_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("_partition", DataType::Int32, true),
        Field::new("_offset", DataType::Int64, true),
        Field::new(
            "_timestamp",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            true,
        ),
        Field::new("key", DataType::Utf8, true),
        Field::new("payload", DataType::Utf8, true),
        Field::new("headers", DataType::Utf8, true),
    ]))
}

fn seek_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("partition", DataType::Int32, false),
        Field::new("committed_offset", DataType::Int64, false),
    ]))
}

/// `SHOW TOPICS` and `SHOW SUBSCRIPTIONS` are queries over the system
/// relations; this is the query a statement stands for, if it is one.
pub(super) fn show_query(statement: &WeirStatement) -> Option<&'static str> {
    match statement {
        WeirStatement::ShowTopics => Some(
            "SELECT topic AS name, max(partitions) AS partitions, sum(messages) AS messages, \
             max(topic_bytes) AS bytes FROM weir_topics GROUP BY topic ORDER BY topic",
        ),
        WeirStatement::ShowSources => Some(
            "SELECT s.source AS name, s.topic, s.format, s.watermark, st.messages, \
             st.dead_letters, st.late_rows, s.delivery, s.status FROM weir_sources s \
             JOIN weir_source_stats st ON s.source = st.source ORDER BY s.source",
        ),
        WeirStatement::ShowMaterializedViews => Some(
            "SELECT view AS name, emit, rows, status, definition FROM weir_materialized_views \
             ORDER BY view",
        ),
        WeirStatement::ShowSinks => Some(
            "SELECT sink AS name, from_view AS \"from\", connector, target, rows, status, \
             delivery, last_epoch FROM weir_sinks ORDER BY sink",
        ),
        WeirStatement::ShowSubscriptions => Some(
            "SELECT subscription AS name, max(mode) AS mode, sum(lag) AS lag, \
             max(in_flight) AS in_flight, max(redeliveries) AS redeliveries, \
             max(dead_lettered) AS dead_lettered FROM weir_subscriptions \
             GROUP BY subscription ORDER BY subscription",
        ),
        _ => None,
    }
}

/// Result columns of a Weir statement (empty for commands).
pub(super) fn result_schema(statement: &WeirStatement) -> SchemaRef {
    match statement {
        WeirStatement::Fetch { .. } => fetch_schema(),
        WeirStatement::CommitSubscription { .. } => seek_schema(),
        WeirStatement::ExplainMaterializedView { .. } => super::stream::explain_schema(),
        _ => Arc::new(Schema::empty()),
    }
}

fn command(tag: impl fmt::Display, rows: Option<u64>) -> Output {
    Output::Command {
        tag: tag.to_string(),
        rows,
    }
}

fn headers_json(headers: &[(String, Bytes)]) -> Option<String> {
    if headers.is_empty() {
        return None;
    }
    let map: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                serde_json::Value::String(String::from_utf8_lossy(v).into_owned()),
            )
        })
        .collect();
    Some(serde_json::Value::Object(map).to_string())
}

fn text(bytes: &Bytes) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn deliveries_output(topic: &str, deliveries: Vec<Delivery>) -> WeirResult<Output> {
    let n = deliveries.len();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![topic; n])),
        Arc::new(Int32Array::from_iter_values(
            deliveries.iter().map(|d| d.partition as i32),
        )),
        Arc::new(Int64Array::from_iter_values(
            deliveries.iter().map(|d| d.offset as i64),
        )),
        Arc::new(StringArray::from_iter(
            deliveries.iter().map(|d| d.key.as_ref().map(text)),
        )),
        Arc::new(StringArray::from_iter_values(
            deliveries.iter().map(|d| text(&d.payload)),
        )),
        Arc::new(StringArray::from_iter(
            deliveries.iter().map(|d| headers_json(&d.headers)),
        )),
        Arc::new(Int32Array::from_iter_values(
            deliveries.iter().map(|d| d.delivery_count as i32),
        )),
        Arc::new(StringArray::from_iter(
            deliveries.iter().map(|d| d.lease_id.clone()),
        )),
    ];
    Output::from_columns(fetch_schema(), columns)
}

/// Runs one of Weir's queue statements for session consumer `consumer`.
pub(super) async fn execute(
    weir: &Weir,
    consumer: &str,
    statement: &WeirStatement,
) -> WeirResult<Output> {
    match statement {
        WeirStatement::ShowTopics
        | WeirStatement::ShowSubscriptions
        | WeirStatement::ShowSources
        | WeirStatement::ShowSinks
        | WeirStatement::ShowMaterializedViews => Err(WeirError::internal(
            "SHOW statements run as queries and never reach execute",
        )),
        WeirStatement::CreateSource { .. }
        | WeirStatement::DropSource { .. }
        | WeirStatement::CreateMaterializedView { .. }
        | WeirStatement::DropMaterializedView { .. }
        | WeirStatement::ExplainMaterializedView { .. }
        | WeirStatement::CreateSink { .. }
        | WeirStatement::DropSink { .. }
        | WeirStatement::Checkpoint
        | WeirStatement::Flush => Err(WeirError::internal(
            "streaming statements are run by engine::stream",
        )),
        WeirStatement::CreateTopic {
            name,
            if_not_exists,
            options,
        } => {
            topic_config(options)?; // validate before anything is written
            let _ddl = weir.inner.ddl.lock().await;
            if weir.inner.catalog.get(name).is_some() && *if_not_exists {
                return Ok(command("CREATE TOPIC", None));
            }
            let relation =
                weir.inner
                    .catalog
                    .create(name, RelationKind::Topic, statement.to_string())?;
            if let Err(e) = open_topic(weir, relation).await {
                let _ = weir.inner.catalog.drop_relation(name);
                return Err(e);
            }
            Ok(command("CREATE TOPIC", None))
        }
        WeirStatement::DropTopic { name, if_exists } => {
            let _ddl = weir.inner.ddl.lock().await;
            match weir.inner.catalog.get(name) {
                Some(r) if r.kind == RelationKind::Topic => {}
                _ if *if_exists => return Ok(command("DROP TOPIC", None)),
                _ => return Err(undefined("topic", name)),
            }
            let dependants: Vec<String> = weir
                .inner
                .catalog
                .relations()
                .into_iter()
                .filter(|r| r.kind == RelationKind::Subscription)
                .filter(|r| matches!(reparse(weir, r), Ok(WeirStatement::CreateSubscription { topic, .. }) if &topic == name))
                .map(|r| r.name)
                .chain(
                    weir.open_sources()
                        .into_iter()
                        .filter(|s| s.topic_name.as_deref() == Some(name.as_str()))
                        .map(|s| s.relation.name.clone()),
                )
                .collect();
            if !dependants.is_empty() {
                return Err(WeirError::new(
                    SqlState("2BP01"),
                    format!("cannot drop topic \"{name}\" because other objects depend on it"),
                )
                .with_detail(format!(
                    "subscriptions and sources: {}",
                    dependants.join(", ")
                ))
                .with_hint("drop the subscriptions and sources first"));
            }
            if let Some(relation) = weir.inner.catalog.drop_relation(name)? {
                let _ = weir.inner.ctx.deregister_table(name.as_str());
                weir.inner
                    .topics
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(name);
                let _ = std::fs::remove_dir_all(weir.storage_dir("topics", relation.id));
            }
            Ok(command("DROP TOPIC", None))
        }
        WeirStatement::AlterTopic { name, options } => {
            let topic = weir.topic(name)?;
            let mut retention_ms = topic.config().retention_ms;
            let mut retention_bytes = topic.config().retention_bytes;
            for (key, value) in options {
                match key.as_str() {
                    "retention" => retention_ms = Some(parse_duration_ms(value)?),
                    "retention_bytes" => retention_bytes = Some(parse_bytes(value)?),
                    other => {
                        return Err(invalid_option(
                            other,
                            &["retention", "retention_bytes"],
                            "ALTER TOPIC",
                        ));
                    }
                }
            }
            blocking(move || {
                topic.set_retention(retention_ms, retention_bytes)?;
                topic.apply_retention(now_ms())
            })
            .await?;
            Ok(command("ALTER TOPIC", None))
        }
        WeirStatement::CreateSubscription {
            name,
            topic,
            if_not_exists,
            options,
        } => {
            subscription_config(options)?;
            weir.topic(topic)?;
            let _ddl = weir.inner.ddl.lock().await;
            if weir.inner.catalog.get(name).is_some() && *if_not_exists {
                return Ok(command("CREATE SUBSCRIPTION", None));
            }
            let relation = weir.inner.catalog.create(
                name,
                RelationKind::Subscription,
                statement.to_string(),
            )?;
            if let Err(e) = open_subscription(weir, relation).await {
                let _ = weir.inner.catalog.drop_relation(name);
                return Err(e);
            }
            Ok(command("CREATE SUBSCRIPTION", None))
        }
        WeirStatement::DropSubscription { name, if_exists } => {
            let _ddl = weir.inner.ddl.lock().await;
            match weir.inner.catalog.get(name) {
                Some(r) if r.kind == RelationKind::Subscription => {}
                _ if *if_exists => return Ok(command("DROP SUBSCRIPTION", None)),
                _ => return Err(undefined("subscription", name)),
            }
            if let Some(relation) = weir.inner.catalog.drop_relation(name)? {
                weir.inner
                    .subscriptions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(name);
                let _ = std::fs::remove_dir_all(weir.storage_dir("subscriptions", relation.id));
            }
            Ok(command("DROP SUBSCRIPTION", None))
        }
        WeirStatement::Fetch {
            subscription,
            max,
            wait,
        } => {
            let wait_ms = match wait {
                Some(w) => parse_duration_ms(w)?,
                None => 0,
            };
            let (topic, deliveries) = weir.fetch(subscription, consumer, *max, wait_ms).await?;
            deliveries_output(&topic, deliveries)
        }
        WeirStatement::Ack {
            subscription,
            lease_ids,
        }
        | WeirStatement::Nack {
            subscription,
            lease_ids,
        } => {
            let ack = matches!(statement, WeirStatement::Ack { .. });
            let n = weir.settle(subscription, lease_ids.clone(), ack).await?;
            Ok(command(if ack { "ACK" } else { "NACK" }, Some(n as u64)))
        }
        WeirStatement::CommitSubscription { subscription } => {
            let committed = weir.commit_subscription(subscription, consumer).await?;
            Output::from_columns(
                seek_schema(),
                vec![
                    Arc::new(Int32Array::from_iter_values(
                        committed.iter().map(|(p, _)| *p as i32),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        committed.iter().map(|(_, o)| *o as i64),
                    )),
                ],
            )
        }
        WeirStatement::Seek { subscription, to } => {
            let sub = weir.subscription(subscription)?;
            require_stream(&sub, subscription, "SEEK SUBSCRIPTION")?;
            let position = match to {
                SeekTarget::Earliest => StartPosition::Earliest,
                SeekTarget::Latest => StartPosition::Latest,
                SeekTarget::Offset(n) => StartPosition::Offset(*n),
                SeekTarget::Timestamp(t) => StartPosition::Timestamp(timestamp_ms(t)?),
            };
            blocking(move || sub.seek(position)).await?;
            Ok(command("SEEK", None))
        }
    }
}

impl Weir {
    /// Deletes segments past every topic's retention; returns how many.
    pub async fn apply_retention(&self) -> WeirResult<usize> {
        let topics: Vec<Arc<Topic>> = self.open_topics().into_iter().map(|(_, t)| t).collect();
        blocking(move || {
            let now = now_ms();
            topics
                .iter()
                .try_fold(0, |n, t| Ok(n + t.apply_retention(now)?))
        })
        .await
    }

    /// Publishes durably; one position per message, in order.
    pub async fn publish(&self, topic: &str, messages: Vec<Message>) -> WeirResult<Vec<Published>> {
        let topic = self.topic(topic)?;
        blocking(move || topic.publish(&messages)).await
    }

    /// Fetches up to `max` messages for `consumer`, waiting up to `wait_ms`
    /// for some to arrive. Returns the topic's name and the deliveries.
    pub async fn fetch(
        &self,
        subscription: &str,
        consumer: &str,
        max: u64,
        wait_ms: u64,
    ) -> WeirResult<(String, Vec<Delivery>)> {
        let sub = self.subscription(subscription)?;
        let topic_name = sub.topic().name().to_string();
        let max = max.clamp(1, FETCH_MAX) as usize;
        let wait_ms = wait_ms.min(FETCH_WAIT_MAX_MS);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms);
        loop {
            let topic = sub.topic().clone();
            let seen: Vec<u64> = (0..topic.partitions())
                .map(|p| topic.end_offset(p))
                .collect();
            let s = sub.clone();
            let who = consumer.to_string();
            let deliveries = blocking(move || s.fetch(&who, max, now_ms())).await?;
            if !deliveries.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok((topic_name, deliveries));
            }
            // Wake on a publish, and at least every second so expired
            // leases in queue mode are redelivered while waiting.
            let step =
                deadline.min(tokio::time::Instant::now() + std::time::Duration::from_secs(1));
            topic.wait_for_messages(&seen, step).await;
        }
    }

    /// ACK (`ack = true`) or NACK leases of a queue subscription; durable.
    pub async fn settle(
        &self,
        subscription: &str,
        lease_ids: Vec<String>,
        ack: bool,
    ) -> WeirResult<usize> {
        let sub = self.subscription(subscription)?;
        if sub.config().mode != SubscriptionMode::Queue {
            return Err(WeirError::new(
                SqlState("55000"),
                format!("subscription \"{subscription}\" is in stream mode"),
            )
            .with_hint(
                "stream subscriptions use COMMIT SUBSCRIPTION; ACK/NACK are for mode = 'queue'",
            ));
        }
        blocking(move || {
            if ack {
                sub.ack(&lease_ids, now_ms())
            } else {
                sub.nack(&lease_ids, now_ms())
            }
        })
        .await
    }

    /// Commits what `consumer` fetched from a stream subscription; durable.
    pub async fn commit_subscription(
        &self,
        subscription: &str,
        consumer: &str,
    ) -> WeirResult<Vec<(u32, u64)>> {
        let sub = self.subscription(subscription)?;
        require_stream(&sub, subscription, "COMMIT SUBSCRIPTION")?;
        let who = consumer.to_string();
        blocking(move || sub.commit(&who)).await
    }
}

fn require_stream(sub: &Subscription, name: &str, what: &str) -> WeirResult<()> {
    if sub.config().mode == SubscriptionMode::Stream {
        return Ok(());
    }
    Err(WeirError::new(
        SqlState("55000"),
        format!("subscription \"{name}\" is in queue mode"),
    )
    .with_hint(format!(
        "{what} is for mode = 'stream'; queue subscriptions use ACK and NACK"
    )))
}

/// A topic as a table: `SELECT` reads its retained history, `INSERT`
/// publishes (columns `key`, `payload`, `headers` as a JSON object of strings).
#[derive(Debug)]
struct TopicTable {
    name: String,
    topic: Arc<Topic>,
}

#[async_trait]
impl TableProvider for TopicTable {
    fn schema(&self) -> SchemaRef {
        topic_table_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn DfSession,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let mut partitions = Vec::new();
        for partition in 0..self.topic.partitions() {
            let mut batches = Vec::new();
            let mut from = self.topic.start_offset(partition);
            loop {
                let records = self
                    .topic
                    .read(partition, from, 8192)
                    .map_err(|e| to_df(queue_error(e)))?;
                let Some(last) = records.last() else { break };
                from = last.offset + 1;
                let n = records.len();
                let columns: Vec<ArrayRef> = vec![
                    Arc::new(Int32Array::from(vec![partition as i32; n])),
                    Arc::new(Int64Array::from_iter_values(
                        records.iter().map(|r| r.offset as i64),
                    )),
                    Arc::new(TimestampMillisecondArray::from_iter_values(
                        records.iter().map(|r| r.timestamp_ms),
                    )),
                    Arc::new(StringArray::from_iter(
                        records.iter().map(|r| r.key.as_ref().map(text)),
                    )),
                    Arc::new(StringArray::from_iter(
                        records.iter().map(|r| Some(text(&r.payload))),
                    )),
                    Arc::new(StringArray::from_iter(
                        records.iter().map(|r| headers_json(&r.headers)),
                    )),
                ];
                batches.push(RecordBatch::try_new(topic_table_schema(), columns)?);
            }
            partitions.push(batches);
        }
        Ok(MemorySourceConfig::try_new_exec(
            &partitions,
            self.schema(),
            projection.cloned(),
        )?)
    }

    async fn insert_into(
        &self,
        _state: &dyn DfSession,
        input: Arc<dyn ExecutionPlan>,
        insert_op: InsertOp,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        if insert_op != InsertOp::Append {
            return Err(to_df(WeirError::unsupported(
                "topics are append-only",
                "publish with INSERT INTO topic (key, payload) VALUES ...",
            )));
        }
        Ok(Arc::new(DataSinkExec::new(
            input,
            Arc::new(TopicSink {
                name: self.name.clone(),
                topic: self.topic.clone(),
                schema: topic_table_schema(),
            }),
            None,
        )))
    }
}

#[derive(Debug)]
struct TopicSink {
    name: String,
    topic: Arc<Topic>,
    schema: SchemaRef,
}

impl DisplayAs for TopicSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WeirTopicSink: topic={}", self.name)
    }
}

fn string_column(batch: &RecordBatch, name: &str) -> datafusion::error::Result<StringArray> {
    let column = batch.column_by_name(name).ok_or_else(|| {
        DataFusionError::Internal(format!("insert into topic lacks column {name}"))
    })?;
    let column = cast(column, &DataType::Utf8)?;
    Ok(column
        .as_any()
        .downcast_ref::<StringArray>()
        .cloned()
        .unwrap_or_else(|| StringArray::from(Vec::<Option<String>>::new())))
}

/// Messages from rows with `key`, `payload` and `headers` text columns
/// (`INSERT INTO topic`, `COPY topic FROM STDIN`).
pub(super) fn messages_from_batch(batch: &RecordBatch) -> WeirResult<Vec<Message>> {
    use arrow::array::Array;
    let column =
        |name: &str| string_column(batch, name).map_err(|e| WeirError::internal(e.to_string()));
    let keys = column("key")?;
    let payloads = column("payload")?;
    let headers = column("headers")?;
    let mut messages = Vec::with_capacity(batch.num_rows());
    for row in 0..batch.num_rows() {
        if payloads.is_null(row) {
            return Err(
                WeirError::new(SqlState::NOT_NULL_VIOLATION, "a message needs a payload")
                    .with_hint("INSERT INTO topic (key, payload) VALUES ('k', '...')"),
            );
        }
        let headers = if headers.is_null(row) {
            Vec::new()
        } else {
            parse_headers(headers.value(row))?
        };
        messages.push(Message {
            key: (!keys.is_null(row)).then(|| Bytes::from(keys.value(row).to_string())),
            payload: Bytes::from(payloads.value(row).to_string()),
            headers,
        });
    }
    Ok(messages)
}

fn parse_headers(text: &str) -> WeirResult<Vec<(String, Bytes)>> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        WeirError::new(
            SqlState::INVALID_TEXT_REPRESENTATION,
            format!("headers must be a JSON object: {e}"),
        )
    })?;
    let serde_json::Value::Object(map) = value else {
        return Err(WeirError::new(
            SqlState::INVALID_TEXT_REPRESENTATION,
            "headers must be a JSON object of strings",
        ));
    };
    Ok(map
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (k, Bytes::from(v))
        })
        .collect())
}

#[async_trait]
impl DataSink for TopicSink {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    async fn write_all(
        &self,
        mut data: SendableRecordBatchStream,
        _context: &Arc<TaskContext>,
    ) -> datafusion::error::Result<u64> {
        let mut messages = Vec::new();
        while let Some(batch) = data.next().await {
            messages.extend(messages_from_batch(&batch?).map_err(to_df)?);
        }
        let n = messages.len() as u64;
        let topic = self.topic.clone();
        blocking(move || topic.publish(&messages))
            .await
            .map_err(to_df)?;
        Ok(n)
    }
}

/// One value of an `INSERT ... VALUES` row into a topic: a literal or `$n`.
#[derive(Debug, Clone)]
enum Cell {
    Literal(Option<String>),
    /// Zero-based parameter index.
    Param(usize),
}

/// `INSERT INTO topic (key, payload, headers) VALUES (...)` with only
/// literals and parameters: a publish, which needs no query plan. Running it
/// directly keeps DataFusion's optimizer and physical planner off the publish
/// path (they cost more than the append and fsync; see docs/benchmarks.md).
/// Any other INSERT into a topic goes through DataFusion and the topic sink.
#[derive(Debug, Clone)]
pub(super) struct FastPublish {
    topic: String,
    /// For each VALUES position, its index in `key, payload, headers`.
    columns: Vec<usize>,
    rows: Vec<Vec<Cell>>,
}

/// The direct publish a statement stands for, if it has that shape.
pub(super) fn fast_publish(weir: &Weir, statement: &ast::Statement) -> Option<FastPublish> {
    let ast::Statement::Insert(insert) = statement else {
        return None;
    };
    if insert.on.is_some()
        || insert.returning.is_some()
        || insert.overwrite
        || !insert.assignments.is_empty()
        || insert.columns.is_empty()
    {
        return None;
    }
    let ast::TableObject::TableName(name) = &insert.table else {
        return None;
    };
    let topic = super::ddl::normalise(name);
    if !weir.topic_exists(&topic) {
        return None;
    }
    let columns = insert
        .columns
        .iter()
        .map(|c| {
            let c = super::ddl::normalise(c);
            ["key", "payload", "headers"].iter().position(|n| *n == c)
        })
        .collect::<Option<Vec<_>>>()?;
    let source = insert.source.as_ref()?;
    if source.with.is_some() || source.order_by.is_some() || source.limit_clause.is_some() {
        return None;
    }
    let ast::SetExpr::Values(values) = source.body.as_ref() else {
        return None;
    };
    let rows = values
        .rows
        .iter()
        .map(|row| {
            if row.len() != columns.len() {
                return None;
            }
            row.iter()
                .map(|expr| match expr {
                    ast::Expr::Value(v) => match &v.value {
                        ast::Value::SingleQuotedString(s) => Some(Cell::Literal(Some(s.clone()))),
                        ast::Value::Null => Some(Cell::Literal(None)),
                        ast::Value::Number(n, _) => Some(Cell::Literal(Some(n.clone()))),
                        ast::Value::Placeholder(p) => {
                            let n: usize = p.strip_prefix('$')?.parse().ok()?;
                            Some(Cell::Param(n.checked_sub(1)?))
                        }
                        _ => None,
                    },
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
        })
        .collect::<Option<Vec<_>>>()?;
    Some(FastPublish {
        topic,
        columns,
        rows,
    })
}

impl FastPublish {
    /// Publishes the rows with `params` bound; returns the message count.
    pub(super) async fn run(&self, weir: &Weir, params: Option<&ParamValues>) -> WeirResult<u64> {
        let param = |n: usize| -> WeirResult<Option<String>> {
            let value = match params {
                Some(ParamValues::List(values)) => values.get(n).map(|v| &v.value),
                _ => None,
            }
            .ok_or_else(|| {
                WeirError::new(
                    SqlState("08P01"),
                    format!("no value supplied for parameter ${}", n + 1),
                )
            })?;
            Ok(match value {
                v if v.is_null() => None,
                ScalarValue::Utf8(Some(s))
                | ScalarValue::Utf8View(Some(s))
                | ScalarValue::LargeUtf8(Some(s)) => Some(s.clone()),
                ScalarValue::Binary(Some(b))
                | ScalarValue::BinaryView(Some(b))
                | ScalarValue::LargeBinary(Some(b)) => {
                    Some(String::from_utf8_lossy(b).into_owned())
                }
                other => Some(other.to_string()),
            })
        };
        let mut columns: [Vec<Option<String>>; 3] = Default::default();
        for row in &self.rows {
            let mut values: [Option<String>; 3] = Default::default();
            for (cell, &column) in row.iter().zip(&self.columns) {
                values[column] = match cell {
                    Cell::Literal(v) => v.clone(),
                    Cell::Param(n) => param(*n)?,
                };
            }
            for (column, value) in columns.iter_mut().zip(values) {
                column.push(value);
            }
        }
        let [keys, payloads, headers] = columns;
        let schema = Arc::new(Schema::new(
            ["key", "payload", "headers"]
                .iter()
                .map(|n| Field::new(*n, DataType::Utf8, true))
                .collect::<Vec<_>>(),
        ));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(keys)),
                Arc::new(StringArray::from(payloads)),
                Arc::new(StringArray::from(headers)),
            ],
        )
        .map_err(|e| WeirError::internal(format!("building publish batch: {e}")))?;
        let messages = messages_from_batch(&batch)?;
        let n = messages.len() as u64;
        weir.publish(&self.topic, messages).await?;
        Ok(n)
    }
}
