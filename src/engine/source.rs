//! Sources: `CREATE SOURCE`'s definition (columns, watermark, options, format), opening a
//! source (its topic or generator, and its monitor dataflow), and the relation DataFusion sees
//! for it ([`SourceTable`]: `SELECT` decodes the retained history, `INSERT` publishes encoded
//! rows). The statements themselves are dispatched in `stream.rs`.
//!
//! A broker source (`connector = 'rabbitmq'`) is a source over its own topic plus an ingest
//! task that appends the broker's messages to that topic ([`TopicIngestLog`]); everything else
//! (views, `SELECT`, dead letters, `FLUSH`) reads the topic as for a builtin source. Such a
//! source refuses `INSERT` and `COPY`: its only writer is the ingest.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Schema, SchemaRef};
use async_trait::async_trait;
use bytes::Bytes;
use datafusion::catalog::{Session as DfSession, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::sink::{DataSink, DataSinkExec};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan};
use datafusion::sql::sqlparser::ast;
use futures::StreamExt;

use super::table::to_df;
use super::{Weir, ddl, queue};
use crate::catalog::Relation;
use crate::connector::api::Source;
use crate::connector::builtin::{METADATA_COLUMNS, TopicSource};
use crate::connector::nexmark::{self, NexmarkConfig, NexmarkSource};
use crate::connector::rabbitmq::{
    self, IngestLog, IngestMessage, IngestStatus, RabbitMqConfig, RabbitMqMode,
};
use crate::format::decode::{SourceFormat, encode_csv, encode_json};
use crate::plan::window::interval_ns;
use crate::queue::topic::{Message, Topic, TopicConfig, message_bytes};
use crate::sql::{Options, WatermarkDef, WeirStatement};
use crate::state::ZSetState;
use crate::stream::{
    DataflowBuilder, DiscardOperator, Progress, RunningDataflow, SourceStats, TaskHandle,
    ViewOutput, WatermarkSpec,
};
use crate::types::{SqlState, WeirError, WeirResult};

const SOURCE_OPTIONS: &[&str] = &["connector", "topic", "partitions", "idle_timeout"];

/// An open source.
pub struct SourceHandle {
    pub relation: Relation,
    /// The topic read (`None` for a generator).
    pub topic: Option<Arc<Topic>>,
    /// Set for `connector = 'nexmark'`.
    pub nexmark: Option<NexmarkConfig>,
    /// The topic's name (a named topic) or `None` (the source's own).
    pub topic_name: Option<String>,
    pub schema: SchemaRef,
    pub format: SourceFormat,
    pub watermark: Option<WatermarkSpec>,
    pub watermark_text: Option<String>,
    pub stats: Arc<SourceStats>,
    /// Reads the source when no view does (counts, dead letters, late rows); stopped when the
    /// handle drops. `None` for generators.
    pub(super) monitor: Mutex<Option<RunningDataflow>>,
    /// Set while views read the source: they keep its counts current, so the monitor rests.
    pub(super) monitor_paused: Arc<std::sync::atomic::AtomicBool>,
    /// Set for `connector = 'rabbitmq'`: the ingest appending the broker's messages to `topic`.
    pub(super) ingest: Option<BrokerIngest>,
}

/// A broker source's ingest task and what it reports.
pub(super) struct BrokerIngest {
    pub(super) config: RabbitMqConfig,
    /// Written by the ingest task, read by `weir_sources`.
    pub(super) status: Arc<IngestStatus>,
    /// Holds the ingest's acknowledgements until the readers' checkpoints cover them.
    pub(super) gate: Arc<rabbitmq::AckGate>,
    /// The ingest (`rabbitmq::run`); aborted when the handle drops (DROP SOURCE, shutdown).
    /// Unacknowledged deliveries then go back to the queue when its connection closes.
    _task: TaskHandle,
}

impl BrokerIngest {
    fn acks_after_checkpoint(&self) -> bool {
        self.config.mode == RabbitMqMode::Queue && self.config.ack == rabbitmq::AckAfter::Checkpoint
    }
}

impl fmt::Debug for SourceHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceHandle")
            .field("name", &self.relation.name)
            .finish()
    }
}

impl SourceHandle {
    pub(super) fn reader(&self) -> WeirResult<Box<dyn Source>> {
        if let Some(config) = self.nexmark {
            return Ok(Box::new(NexmarkSource::try_new(
                config,
                self.schema.clone(),
            )?));
        }
        let topic = self
            .topic
            .clone()
            .ok_or_else(|| WeirError::internal("source without a topic or generator"))?;
        let required = self.watermark.map(|w| vec![w.column]).unwrap_or_default();
        Ok(Box::new(TopicSource::try_new(
            topic,
            self.schema.clone(),
            self.format,
            required,
        )?))
    }

    /// A reader for a dataflow (a view's, a sink's, the monitor's: `paused` is its rest
    /// flag). For a RabbitMQ queue source with `ack = 'checkpoint'` it reports the dataflow's
    /// checkpoints to the ingest, which acknowledges what every reader's checkpoint covers.
    pub(super) fn dataflow_reader(
        &self,
        paused: Option<Arc<std::sync::atomic::AtomicBool>>,
    ) -> WeirResult<Box<dyn Source>> {
        let reader = self.reader()?;
        Ok(match &self.ingest {
            Some(i) if i.acks_after_checkpoint() => i.gate.reader(reader, paused),
            _ => reader,
        })
    }

    /// The delivery guarantee views get, for `SHOW SOURCES`.
    pub fn delivery(&self) -> &'static str {
        match &self.ingest {
            Some(i) if i.config.mode == RabbitMqMode::Stream => {
                "exactly once: stream offset stored with each message"
            }
            Some(i) if i.acks_after_checkpoint() => {
                "exactly once: acknowledged after the checkpoints that cover it; redeliveries deduplicated"
            }
            Some(_) => {
                "exactly once: acknowledged after the durable append; redeliveries deduplicated"
            }
            None if self.nexmark.is_some() => {
                "exactly once: a deterministic generator, replayed on restart"
            }
            None => "exactly once: views are rebuilt from the retained log",
        }
    }

    /// What the source reads, for `weir_sources` (never a password).
    pub fn origin(&self) -> String {
        if let Some(ingest) = &self.ingest {
            return ingest.config.origin();
        }
        match (&self.nexmark, &self.topic_name) {
            (Some(c), _) => format!("nexmark generator ({} bids)", c.events),
            (None, Some(t)) => t.clone(),
            (None, None) => format!("{} (own)", self.relation.name),
        }
    }

    /// The ingest's state for `weir_sources` and `SHOW SOURCES`: `running` for sources Weir
    /// writes itself; for a broker source `connecting`, `running` or `reconnecting (attempt N):
    /// <error>`.
    pub fn status(&self) -> String {
        match &self.ingest {
            Some(i) => i.status.snapshot().state,
            None => "running".to_string(),
        }
    }

    /// The broker ingest's counters, if this is a broker source.
    pub fn ingest_status(&self) -> Option<rabbitmq::IngestSnapshot> {
        self.ingest.as_ref().map(|i| i.status.snapshot())
    }

    /// 0A000 for a broker source: its only writer is the ingest.
    fn refuse_writes(&self) -> WeirResult<()> {
        match &self.ingest {
            Some(i) => Err(WeirError::unsupported(
                format!(
                    "source \"{}\" reads RabbitMQ queue \"{}\" and cannot be written to",
                    self.relation.name, i.config.queue
                ),
                format!(
                    "publish to the RabbitMQ queue \"{}\" instead",
                    i.config.queue
                ),
            )),
            None => Ok(()),
        }
    }
}

/// A `CREATE SOURCE` checked and planned.
pub(super) struct SourceDefinition {
    /// The source's name.
    name: String,
    schema: SchemaRef,
    nexmark: Option<NexmarkConfig>,
    /// Set for `connector = 'rabbitmq'`.
    rabbitmq: Option<RabbitMqConfig>,
    format: SourceFormat,
    watermark: Option<WatermarkSpec>,
    watermark_text: Option<String>,
    pub(super) topic_name: Option<String>,
    pub(super) topic_options: Options,
}

impl SourceDefinition {
    /// Connects to the source's broker once, at `CREATE SOURCE` time, so that a source that
    /// cannot read fails there (08001, 28P01, 42704, ...) rather than in `weir_sources` later.
    pub(super) async fn check_connector(&self) -> WeirResult<()> {
        match &self.rabbitmq {
            Some(config) => rabbitmq::check(config, &self.name).await,
            None => Ok(()),
        }
    }
}

pub(super) async fn source_definition(
    weir: &Weir,
    statement: &WeirStatement,
) -> WeirResult<SourceDefinition> {
    let WeirStatement::CreateSource {
        name,
        columns,
        watermark,
        options,
        format,
        ..
    } = statement
    else {
        return Err(WeirError::internal("not CREATE SOURCE"));
    };
    let format = SourceFormat::parse(format)?;
    let mut topic_name = None;
    let mut topic_options = Vec::new();
    let is_nexmark = options
        .iter()
        .any(|(k, v)| k == "connector" && v.eq_ignore_ascii_case("nexmark"));
    let is_rabbitmq = options
        .iter()
        .any(|(k, v)| k == "connector" && v.eq_ignore_ascii_case("rabbitmq"));
    let rabbitmq = if is_rabbitmq {
        Some(RabbitMqConfig::from_options(options)?)
    } else {
        None
    };
    let nexmark = if is_nexmark {
        if let Some((key, _)) = options
            .iter()
            .find(|(k, _)| !nexmark::OPTIONS.contains(&k.as_str()))
        {
            return Err(WeirError::new(
                SqlState::INVALID_PARAMETER_VALUE,
                format!("unknown option \"{key}\" for connector 'nexmark'"),
            )
            .with_hint(format!("valid options: {}", nexmark::OPTIONS.join(", "))));
        }
        Some(NexmarkConfig::from_options(options)?)
    } else {
        None
    };
    for (key, value) in options.iter().filter(|_| !is_nexmark && !is_rabbitmq) {
        match key.as_str() {
            "connector" => match value.to_ascii_lowercase().as_str() {
                "builtin" => {}
                "nats" | "mqtt" | "kafka" | "datagen" | "file" => {
                    return Err(WeirError::unsupported(
                        format!("connector '{value}' is not available yet"),
                        "use connector = 'builtin' (a Weir topic); broker connectors are being built",
                    ));
                }
                other => {
                    return Err(WeirError::new(
                        SqlState::INVALID_PARAMETER_VALUE,
                        format!("unknown connector '{other}'"),
                    )
                    .with_hint("valid connectors: builtin, nexmark, rabbitmq"));
                }
            },
            "topic" => topic_name = Some(value.clone()),
            "idle_timeout" => {}
            "partitions" => topic_options.push((key.clone(), value.clone())),
            other => {
                return Err(WeirError::new(
                    SqlState::INVALID_PARAMETER_VALUE,
                    format!("unknown source option \"{other}\""),
                )
                .with_hint(format!("valid options: {}", SOURCE_OPTIONS.join(", "))));
            }
        }
    }
    if columns.is_empty() {
        return Err(WeirError::new(
            SqlState::INVALID_PARAMETER_VALUE,
            format!("source \"{name}\" needs columns"),
        )
        .with_hint("CREATE SOURCE s (id BIGINT, ts TIMESTAMP, ...) FORMAT JSON"));
    }
    let table_sql = format!("CREATE TABLE weir_source_columns ({})", columns.join(", "));
    let parsed = weir.inner.parser.parse_sql(&table_sql)?;
    let stmt = parsed
        .first()
        .ok_or_else(|| WeirError::internal("empty source column list"))?;
    let def = ddl::plan_definition(weir, &table_sql, stmt).await?;
    let schema = def.schema;
    let idle_timeout_ms = match options.iter().find(|(k, _)| k == "idle_timeout") {
        Some((_, v)) => Some(crate::sql::parse_duration_ms(v)?.max(1)),
        None => None,
    };
    let (watermark, watermark_text) = match watermark {
        None if idle_timeout_ms.is_some() => {
            return Err(WeirError::new(
                SqlState::INVALID_PARAMETER_VALUE,
                "idle_timeout needs a WATERMARK",
            )
            .with_hint(
                "declare WATERMARK FOR ts AS ts - INTERVAL '5' SECOND, or drop idle_timeout",
            ));
        }
        None => (None, None),
        Some(w) => {
            let mut spec = watermark_spec(weir, &schema, w).await?;
            spec.idle_timeout_ms = idle_timeout_ms;
            let idle = idle_timeout_ms.map_or(String::new(), |ms| format!(", idle after {ms}ms"));
            (
                Some(spec),
                Some(format!("{} AS {}{idle}", w.column, w.expr)),
            )
        }
    };
    Ok(SourceDefinition {
        name: name.clone(),
        schema,
        nexmark,
        rabbitmq,
        format,
        watermark,
        watermark_text,
        topic_name,
        topic_options,
    })
}

/// `WATERMARK FOR ts AS ts - INTERVAL '5' SECOND` → column index and delay.
async fn watermark_spec(
    weir: &Weir,
    schema: &SchemaRef,
    w: &WatermarkDef,
) -> WeirResult<WatermarkSpec> {
    let column = schema.index_of(&w.column).map_err(|_| {
        WeirError::new(
            SqlState::UNDEFINED_COLUMN,
            format!(
                "watermark column \"{}\" is not a column of the source",
                w.column
            ),
        )
    })?;
    if schema.field(column).data_type()
        != &DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, None)
    {
        return Err(WeirError::new(
            SqlState::DATATYPE_MISMATCH,
            format!("watermark column \"{}\" must be a TIMESTAMP", w.column),
        ));
    }
    let bad = || {
        WeirError::new(
            SqlState::INVALID_PARAMETER_VALUE,
            format!("unsupported watermark expression \"{}\"", w.expr),
        )
        .with_hint(format!(
            "write WATERMARK FOR {0} AS {0} - INTERVAL '5' SECOND (or AS {0})",
            w.column
        ))
    };
    let expr = datafusion::sql::sqlparser::parser::Parser::new(
        &datafusion::sql::sqlparser::dialect::PostgreSqlDialect {},
    )
    .try_with_sql(&w.expr)
    .and_then(|mut p| p.parse_expr())
    .map_err(|_| bad())?;
    let is_column = |e: &ast::Expr| matches!(e, ast::Expr::Identifier(i) if i.value.eq_ignore_ascii_case(&w.column));
    let delay_ns = match &expr {
        e if is_column(e) => 0,
        ast::Expr::BinaryOp {
            left,
            op: ast::BinaryOperator::Minus,
            right,
        } if is_column(left) => {
            let plan = weir
                .inner
                .ctx
                .state()
                .create_logical_plan(&format!("SELECT {right}"))
                .await
                .map_err(|_| bad())?;
            let LogicalPlan::Projection(p) = plan else {
                return Err(bad());
            };
            match p.expr.first().map(|e| e.clone().unalias()) {
                Some(Expr::Literal(value, _)) => interval_ns(&value).ok_or_else(bad)?,
                _ => return Err(bad()),
            }
        }
        _ => return Err(bad()),
    };
    if delay_ns < 0 {
        return Err(bad());
    }
    Ok(WatermarkSpec {
        column,
        delay_ns,
        idle_timeout_ms: None,
    })
}

/// Opens a source from its catalog entry (its named topic must be open).
/// `monitor`: start the source's monitor now (on `CREATE`; on start the engine starts
/// monitors once the views are open).
pub(super) async fn open_source(weir: &Weir, relation: Relation, monitor: bool) -> WeirResult<()> {
    let statement = match weir.parse(&relation.sql)?.pop() {
        Some(crate::sql::Statement::Weir(w)) => w,
        _ => {
            return Err(WeirError::internal(
                "source definition is not CREATE SOURCE",
            ));
        }
    };
    let def = source_definition(weir, &statement).await?;
    let topic = match &def.topic_name {
        _ if def.nexmark.is_some() => None,
        Some(name) => Some(weir.topic_arc(name)?),
        None => {
            let dir = weir.storage_dir("sources", relation.id);
            let mut config = TopicConfig::default();
            if let Some((_, p)) = def.topic_options.iter().find(|(k, _)| k == "partitions") {
                config.partitions = p.parse().map_err(|_| {
                    WeirError::new(
                        SqlState::INVALID_PARAMETER_VALUE,
                        format!("partitions must be a whole number, not \"{p}\""),
                    )
                })?;
            }
            let name = relation.name.clone();
            Some(Arc::new(
                tokio::task::spawn_blocking(move || {
                    Topic::open(&dir, config).map(|t| t.with_name(name))
                })
                .await
                .map_err(|e| WeirError::internal(format!("opening source topic: {e}")))?
                .map_err(queue::queue_error)?,
            ))
        }
    };
    let ingest = match (&def.rabbitmq, &topic) {
        (Some(config), Some(topic)) => {
            let status = Arc::new(IngestStatus::new());
            let gate = rabbitmq::AckGate::new();
            let log = Arc::new(TopicIngestLog {
                topic: topic.clone(),
                marker: weir
                    .storage_dir("sources", relation.id)
                    .join(ACKED_MARKER_FILE),
            });
            let task = TaskHandle::spawn(
                "rabbitmq-ingest",
                rabbitmq::run(
                    config.clone(),
                    relation.name.clone(),
                    log,
                    status.clone(),
                    gate.clone(),
                ),
            );
            Some(BrokerIngest {
                config: config.clone(),
                status,
                gate,
                _task: task,
            })
        }
        _ => None,
    };
    let handle = Arc::new(SourceHandle {
        ingest,
        stats: Arc::new(SourceStats::new(relation.name.clone())),
        topic,
        nexmark: def.nexmark,
        topic_name: def.topic_name,
        schema: def.schema,
        format: def.format,
        watermark: def.watermark,
        watermark_text: def.watermark_text,
        monitor: Mutex::new(None),
        monitor_paused: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        relation: relation.clone(),
    });
    handle.reader()?; // checks the schema is one the decoder takes
    weir.register_relation(
        &relation.name,
        Arc::new(SourceTable {
            source: handle.clone(),
        }),
    )?;
    weir.lock_sources()
        .insert(relation.name.clone(), handle.clone());
    if monitor {
        start_monitor(weir, &handle)?;
    }
    Ok(())
}

/// Starts a source's monitor: a dataflow that reads the source when no view does, so its
/// counts and dead letters stay current. It checkpoints its position like a view, so a
/// restart does not read the whole log again. On start the engine starts monitors after
/// the views, which rest the monitors of the sources they read.
pub(super) fn start_monitor(weir: &Weir, handle: &Arc<SourceHandle>) -> WeirResult<()> {
    let relation = &handle.relation;
    if handle.nexmark.is_none() {
        let reader = handle.dataflow_reader(Some(handle.monitor_paused.clone()))?;
        let mut builder = DataflowBuilder::new();
        let input = builder.input(
            &relation.name,
            reader,
            handle.watermark,
            false,
            Some(handle.stats.clone()),
        );
        let root = builder.operator(Box::new(DiscardOperator), vec![input]);
        let output = ViewOutput {
            state: Arc::new(Mutex::new(ZSetState::try_new(
                Arc::new(Schema::empty()),
                Vec::new(),
            )?)),
            progress: Arc::new(Mutex::new(Progress::default())),
        };
        let (checkpointing, _) =
            super::view::checkpointing(weir, relation, format!("monitor\n{}", relation.sql));
        let running = builder
            .build(root)
            .with_pause(handle.monitor_paused.clone())
            .with_checkpoints(checkpointing)
            .start(&format!("source-{}", relation.name), output)?;
        *handle.monitor.lock().unwrap_or_else(|p| p.into_inner()) = Some(running);
    }
    Ok(())
}

/// The queue-mode "acknowledged through offset X" marker, next to the source's topic.
const ACKED_MARKER_FILE: &str = "rabbitmq-acked-through";

/// A broker source's topic as the ingest's write-ahead log (partition 0: broker sources have
/// one partition), with the acknowledged-through marker file beside it.
struct TopicIngestLog {
    topic: Arc<Topic>,
    /// `sources/<id>/rabbitmq-acked-through`: the offset in decimal.
    marker: PathBuf,
}

fn to_topic_message(message: IngestMessage) -> Message {
    Message {
        key: None,
        payload: message.payload,
        headers: message.headers,
    }
}

impl IngestLog for TopicIngestLog {
    fn append(&self, messages: Vec<IngestMessage>) -> WeirResult<u64> {
        let messages: Vec<Message> = messages.into_iter().map(to_topic_message).collect();
        let published = self.topic.publish(&messages).map_err(queue::queue_error)?;
        published
            .last()
            .map(|p| p.offset)
            .ok_or_else(|| WeirError::internal("appended an empty batch"))
    }

    fn fits(&self, message: &IngestMessage) -> bool {
        let size = message_bytes(&to_topic_message(message.clone()));
        size <= u64::from(self.topic.config().message_bytes_max)
    }

    fn end_offset(&self) -> u64 {
        self.topic.end_offset(0)
    }

    fn read(&self, from: u64, max: usize) -> WeirResult<Vec<(u64, IngestMessage)>> {
        Ok(self
            .topic
            .read(0, from, max)
            .map_err(queue::queue_error)?
            .into_iter()
            .map(|r| {
                (
                    r.offset,
                    IngestMessage {
                        payload: r.payload,
                        headers: r.headers,
                    },
                )
            })
            .collect())
    }

    fn acked_through(&self) -> WeirResult<Option<u64>> {
        match std::fs::read_to_string(&self.marker) {
            Ok(text) => match text.trim().parse() {
                Ok(offset) => Ok(Some(offset)),
                Err(_) => {
                    // A marker torn by a power loss: check the whole log instead.
                    tracing::warn!(path = %self.marker.display(), "unreadable acknowledged-through marker; ignoring it");
                    Ok(None)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(WeirError::io(self.marker.display(), e)),
        }
    }

    fn set_acked_through(&self, offset: u64) -> WeirResult<()> {
        let tmp = self.marker.with_extension("tmp");
        std::fs::write(&tmp, offset.to_string()).map_err(|e| WeirError::io(tmp.display(), e))?;
        std::fs::rename(&tmp, &self.marker).map_err(|e| WeirError::io(self.marker.display(), e))
    }
}

/// A source as a relation: `SELECT` decodes its topic's retained history (bad messages are
/// skipped: they are in `weir_dead_letters`); `INSERT` encodes rows in the source's format and
/// publishes them.
pub(super) struct SourceTable {
    pub(super) source: Arc<SourceHandle>,
}

impl fmt::Debug for SourceTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SourceTable({})", self.source.relation.name)
    }
}

#[async_trait]
impl TableProvider for SourceTable {
    fn schema(&self) -> SchemaRef {
        self.source.schema.clone()
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
        let mut reader = self.source.reader().map_err(to_df)?;
        let mut batches = Vec::new();
        while let Some(chunk) = reader.poll(8192).map_err(to_df)? {
            batches.push(chunk.changes.rows);
        }
        let schema = super::table::nullable(&self.source.schema);
        let batches = batches
            .into_iter()
            .map(|b| RecordBatch::try_new(schema.clone(), b.columns().to_vec()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MemorySourceConfig::try_new_exec(
            &[batches],
            schema,
            projection.cloned(),
        )?)
    }

    async fn insert_into(
        &self,
        _state: &dyn DfSession,
        input: Arc<dyn ExecutionPlan>,
        insert_op: InsertOp,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        self.source.refuse_writes().map_err(to_df)?;
        if insert_op != InsertOp::Append {
            return Err(to_df(WeirError::unsupported(
                "sources are append-only",
                "publish with INSERT INTO source VALUES ...",
            )));
        }
        Ok(Arc::new(DataSinkExec::new(
            input,
            Arc::new(SourceSink {
                source: self.source.clone(),
            }),
            None,
        )))
    }
}

struct SourceSink {
    source: Arc<SourceHandle>,
}

impl fmt::Debug for SourceSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SourceSink({})", self.source.relation.name)
    }
}

impl DisplayAs for SourceSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WeirSourceSink: source={}", self.source.relation.name)
    }
}

#[async_trait]
impl DataSink for SourceSink {
    fn schema(&self) -> &SchemaRef {
        &self.source.schema
    }

    async fn write_all(
        &self,
        mut data: SendableRecordBatchStream,
        _context: &Arc<TaskContext>,
    ) -> datafusion::error::Result<u64> {
        let mut batches = Vec::new();
        while let Some(batch) = data.next().await {
            batches.push(batch?);
        }
        publish_rows(&self.source, &batches).await.map_err(to_df)
    }
}

/// Encodes rows of a source's columns in its format and publishes them to its topic, one
/// message per row, durably (`INSERT INTO source`, `COPY source FROM STDIN`).
pub(super) async fn publish_rows(
    source: &SourceHandle,
    batches: &[RecordBatch],
) -> WeirResult<u64> {
    source.refuse_writes()?;
    let mut messages = Vec::new();
    for batch in batches {
        // Metadata columns come from the message, not its payload.
        let keep: Vec<usize> = (0..batch.num_columns())
            .filter(|&i| {
                let name = batch.schema().field(i).name().clone();
                !METADATA_COLUMNS.iter().any(|(m, _)| *m == name)
            })
            .collect();
        let batch = batch
            .project(&keep)
            .map_err(|e| WeirError::internal(format!("source rows: {e}")))?;
        if let Some(w) = source.watermark {
            let name = source.schema.field(w.column).name();
            if let Some(c) = batch.column_by_name(name)
                && c.null_count() > 0
            {
                return Err(WeirError::new(
                    SqlState::NOT_NULL_VIOLATION,
                    format!("event-time column \"{name}\" cannot be NULL"),
                )
                .with_hint("give every row its event time"));
            }
        }
        let payloads = match source.format {
            SourceFormat::Json => encode_json(&batch),
            SourceFormat::Csv => encode_csv(&batch),
        }?;
        messages.extend(payloads.into_iter().map(|p| Message {
            key: None,
            payload: Bytes::from(p),
            headers: Vec::new(),
        }));
    }
    let n = messages.len() as u64;
    let topic = source.topic.clone().ok_or_else(|| {
        WeirError::unsupported(
            format!(
                "source \"{}\" is a generator and cannot be written to",
                source.relation.name
            ),
            "INSERT into a source over a topic",
        )
    })?;
    tokio::task::spawn_blocking(move || topic.publish(&messages))
        .await
        .map_err(|e| WeirError::internal(format!("publish task: {e}")))?
        .map_err(queue::queue_error)?;
    Ok(n)
}
