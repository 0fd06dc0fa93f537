//! Sources: `CREATE SOURCE`'s definition (columns, watermark, options, format), opening a
//! source (its topic or generator, and its monitor dataflow), and the relation DataFusion sees
//! for it ([`SourceTable`]: `SELECT` decodes the retained history, `INSERT` publishes encoded
//! rows). The statements themselves are dispatched in `stream.rs`.

use std::fmt;
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
use crate::format::decode::{SourceFormat, encode_csv, encode_json};
use crate::plan::window::interval_ns;
use crate::queue::topic::{Message, Topic, TopicConfig};
use crate::sql::{Options, WatermarkDef, WeirStatement};
use crate::state::ZSetState;
use crate::stream::{
    DataflowBuilder, DiscardOperator, Progress, RunningDataflow, SourceStats, ViewOutput,
    WatermarkSpec,
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

    /// The delivery guarantee views get, for `SHOW SOURCES`.
    pub fn delivery(&self) -> &'static str {
        if self.nexmark.is_some() {
            "exactly once: a deterministic generator, replayed on restart"
        } else {
            "exactly once: views are rebuilt from the retained log"
        }
    }

    /// What the source reads, for `weir_sources`.
    pub fn origin(&self) -> String {
        match (&self.nexmark, &self.topic_name) {
            (Some(c), _) => format!("nexmark generator ({} bids)", c.events),
            (None, Some(t)) => t.clone(),
            (None, None) => format!("{} (own)", self.relation.name),
        }
    }
}

/// A `CREATE SOURCE` checked and planned.
pub(super) struct SourceDefinition {
    schema: SchemaRef,
    nexmark: Option<NexmarkConfig>,
    format: SourceFormat,
    watermark: Option<WatermarkSpec>,
    watermark_text: Option<String>,
    pub(super) topic_name: Option<String>,
    pub(super) topic_options: Options,
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
    for (key, value) in options.iter().filter(|_| !is_nexmark) {
        match key.as_str() {
            "connector" => match value.to_ascii_lowercase().as_str() {
                "builtin" => {}
                "rabbitmq" | "nats" | "mqtt" | "kafka" | "datagen" | "file" => {
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
                    .with_hint("valid connectors: builtin, nexmark"));
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
        schema,
        nexmark,
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
pub(super) async fn open_source(weir: &Weir, relation: Relation) -> WeirResult<()> {
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
    let handle = Arc::new(SourceHandle {
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
    let reader = handle.reader()?; // also checks the schema is one the decoder takes
    if handle.nexmark.is_none() {
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
        let running = builder
            .build(root)
            .with_pause(handle.monitor_paused.clone())
            .start(&format!("source-{}", relation.name), output)?;
        *handle.monitor.lock().unwrap_or_else(|p| p.into_inner()) = Some(running);
    }
    weir.register_relation(
        &relation.name,
        Arc::new(SourceTable {
            source: handle.clone(),
        }),
    )?;
    weir.lock_sources().insert(relation.name.clone(), handle);
    Ok(())
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
