//! Sources and materialized views: `CREATE SOURCE`, `CREATE MATERIALIZED VIEW`, their `DROP`s,
//! `EXPLAIN CREATE MATERIALIZED VIEW`, `FLUSH`, recovery, and the relations DataFusion sees
//! for them ([`SourceTable`]: a source's decoded history, `INSERT` publishes encoded rows;
//! [`ViewTable`]: a view's current rows).
//!
//! A source is a schema + format over a topic (its own, stored under `sources/<id>/`, or a
//! named topic). A view is its query planned by DataFusion, compiled by `plan::stream` into a
//! dataflow that runs on its own thread and keeps the view's `ZSetState`. Views are rebuilt
//! from the retained history on start (checkpoints come later), so `FLUSH` after a restart
//! waits for the rebuild.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex};

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use bytes::Bytes;
use datafusion::catalog::{Session as DfSession, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::sink::{DataSink, DataSinkExec};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan};
use datafusion::sql::sqlparser::ast;
use futures::StreamExt;

use super::session::Output;
use super::table::to_df;
use super::{Weir, ddl, queue};
use crate::catalog::{Relation, RelationKind};
use crate::connector::api::Source;
use crate::connector::builtin::{METADATA_COLUMNS, TableSource, TopicSource};
use crate::connector::nexmark::{self, NexmarkConfig, NexmarkSource};
use crate::format::decode::{SourceFormat, encode_csv, encode_json};
use crate::plan::from_datafusion;
use crate::plan::stream::{Resolved, StreamCatalog, compile};
use crate::plan::window::WindowTable;
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
    monitor: Mutex<Option<RunningDataflow>>,
}

impl fmt::Debug for SourceHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceHandle")
            .field("name", &self.relation.name)
            .finish()
    }
}

impl SourceHandle {
    fn reader(&self) -> WeirResult<Box<dyn Source>> {
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

/// An open materialized view.
pub struct ViewHandle {
    pub relation: Relation,
    pub schema: SchemaRef,
    /// The optimised plan of its query, compiled inline by views that read this one.
    pub plan: LogicalPlan,
    pub emit_on_window_close: bool,
    /// Relations its query reads (sources, tables, views).
    pub depends_on: BTreeSet<String>,
    pub output: ViewOutput,
    /// Dropping this stops the view's dataflow.
    running: RunningDataflow,
}

impl Weir {
    fn lock_sources(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Arc<SourceHandle>>> {
        self.inner.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_views(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Arc<ViewHandle>>> {
        self.inner.views.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An open source by name.
    pub(super) fn source(&self, name: &str) -> Option<Arc<SourceHandle>> {
        self.lock_sources().get(name).cloned()
    }

    /// Open sources, sorted by name.
    pub(super) fn open_sources(&self) -> Vec<Arc<SourceHandle>> {
        let mut v: Vec<_> = self.lock_sources().values().cloned().collect();
        v.sort_by(|a, b| a.relation.name.cmp(&b.relation.name));
        v
    }

    /// Open views, sorted by name.
    pub(super) fn open_views(&self) -> Vec<Arc<ViewHandle>> {
        let mut v: Vec<_> = self.lock_views().values().cloned().collect();
        v.sort_by(|a, b| a.relation.name.cmp(&b.relation.name));
        v
    }

    /// Registers a relation with DataFusion and with the window functions' lookup.
    pub(super) fn register_relation(
        &self,
        name: &str,
        provider: Arc<dyn TableProvider>,
    ) -> WeirResult<()> {
        self.inner
            .ctx
            .register_table(name, provider.clone())
            .map_err(|e| WeirError::internal(format!("registering {name}: {e}")))?;
        self.inner
            .relations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), provider);
        Ok(())
    }

    pub(super) fn deregister_relation(&self, name: &str) {
        let _ = self.inner.ctx.deregister_table(name);
        self.inner
            .relations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// `FLUSH`: returns when every view reflects every message and table change accepted
    /// before the call.
    pub async fn flush(&self) -> WeirResult<()> {
        for source in self.open_sources() {
            let monitor = source
                .monitor
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(RunningDataflow::flush_handle);
            if let Some(monitor) = monitor {
                monitor
                    .flush()
                    .await
                    .map_err(|e| e.with_detail(format!("source \"{}\"", source.relation.name)))?;
            }
        }
        let views = self.open_views();
        for view in views {
            view.running.flush().await.map_err(|e| {
                e.with_detail(format!("materialized view \"{}\"", view.relation.name))
            })?;
        }
        Ok(())
    }
}

/// Runs one of the streaming statements.
/// `parallelism`: the session's `streaming_parallelism` for new views.
pub(super) async fn execute(
    weir: &Weir,
    statement: &WeirStatement,
    parallelism: usize,
) -> WeirResult<Output> {
    match statement {
        WeirStatement::CreateSource {
            name,
            if_not_exists,
            ..
        } => {
            let _ddl = weir.inner.ddl.lock().await;
            if weir.inner.catalog.get(name).is_some() && *if_not_exists {
                return Ok(command("CREATE SOURCE"));
            }
            // Validate fully before anything durable changes.
            let def = source_definition(weir, statement).await?;
            if let Some(topic) = &def.topic_name
                && !weir.topic_exists(topic)
            {
                let create = WeirStatement::CreateTopic {
                    name: topic.clone(),
                    if_not_exists: true,
                    options: def.topic_options.clone(),
                };
                let relation =
                    weir.inner
                        .catalog
                        .create(topic, RelationKind::Topic, create.to_string())?;
                queue::open_topic(weir, relation).await?;
            }
            let relation =
                weir.inner
                    .catalog
                    .create(name, RelationKind::Source, statement.to_string())?;
            if let Err(e) = open_source(weir, relation).await {
                let _ = weir.inner.catalog.drop_relation(name);
                return Err(e);
            }
            Ok(command("CREATE SOURCE"))
        }
        WeirStatement::DropSource {
            name,
            if_exists,
            cascade,
        } => {
            let _ddl = weir.inner.ddl.lock().await;
            match weir.inner.catalog.get(name) {
                Some(r) if r.kind == RelationKind::Source => {}
                Some(r) => {
                    return Err(WeirError::new(
                        SqlState("42809"),
                        format!("\"{name}\" is not a source"),
                    )
                    .with_hint(format!(
                        "it is a {}; use DROP {}",
                        r.kind.noun(),
                        r.kind.noun().to_uppercase()
                    )));
                }
                None if *if_exists => return Ok(command("DROP SOURCE")),
                None => return Err(undefined("source", name)),
            }
            drop_dependants(weir, name, *cascade, "source")?;
            if let Some(relation) = weir.inner.catalog.drop_relation(name)? {
                weir.deregister_relation(name);
                weir.lock_sources().remove(name);
                let _ = std::fs::remove_dir_all(weir.storage_dir("sources", relation.id));
            }
            Ok(command("DROP SOURCE"))
        }
        WeirStatement::CreateMaterializedView {
            name,
            if_not_exists,
            query,
            emit_on_window_close,
        } => {
            let _ddl = weir.inner.ddl.lock().await;
            if weir.inner.catalog.get(name).is_some() {
                if *if_not_exists {
                    return Ok(command("CREATE MATERIALIZED VIEW"));
                }
                return Err(WeirError::new(
                    SqlState::DUPLICATE_TABLE,
                    format!("relation \"{name}\" already exists"),
                )
                .with_hint("choose another name, or DROP MATERIALIZED VIEW first"));
            }
            // Plan and compile before the catalog changes: a view that cannot run is not created.
            let (plan, depends_on) = plan_view(weir, query).await?;
            let dataflow = build_dataflow(weir, &plan, *emit_on_window_close, query, parallelism)?;
            // The parallelism is part of the definition, so a restart runs the view alike.
            let relation = weir.inner.catalog.create(
                name,
                RelationKind::MaterializedView,
                format!("{statement}{PARALLELISM_MARK}{parallelism}"),
            )?;
            if let Err(e) = start_view(
                weir,
                relation,
                plan,
                *emit_on_window_close,
                depends_on,
                dataflow,
            ) {
                let _ = weir.inner.catalog.drop_relation(name);
                return Err(e);
            }
            Ok(command("CREATE MATERIALIZED VIEW"))
        }
        WeirStatement::DropMaterializedView {
            name,
            if_exists,
            cascade,
        } => {
            let _ddl = weir.inner.ddl.lock().await;
            match weir.inner.catalog.get(name) {
                Some(r) if r.kind == RelationKind::MaterializedView => {}
                Some(r) => {
                    return Err(WeirError::new(
                        SqlState("42809"),
                        format!("\"{name}\" is not a materialized view"),
                    )
                    .with_hint(format!("it is a {}", r.kind.noun())));
                }
                None if *if_exists => return Ok(command("DROP MATERIALIZED VIEW")),
                None => return Err(undefined("materialized view", name)),
            }
            drop_dependants(weir, name, *cascade, "materialized view")?;
            drop_view(weir, name)?;
            Ok(command("DROP MATERIALIZED VIEW"))
        }
        WeirStatement::ExplainMaterializedView {
            query,
            emit_on_window_close,
        } => {
            let (plan, _) = plan_view(weir, query).await?;
            let dataflow = build_dataflow(weir, &plan, *emit_on_window_close, query, parallelism)?;
            let lines = dataflow.explain();
            Output::from_columns(
                explain_schema(),
                vec![Arc::new(StringArray::from(lines)) as ArrayRef],
            )
        }
        WeirStatement::Flush => {
            weir.flush().await?;
            Ok(command("FLUSH"))
        }
        _ => Err(WeirError::internal("not a streaming statement")),
    }
}

pub(super) fn explain_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new(
        "QUERY PLAN",
        DataType::Utf8,
        false,
    )]))
}

fn command(tag: &str) -> Output {
    Output::Command {
        tag: tag.to_string(),
        rows: None,
    }
}

fn undefined(kind: &str, name: &str) -> WeirError {
    WeirError::new(
        SqlState::UNDEFINED_TABLE,
        format!("{kind} \"{name}\" does not exist"),
    )
    .with_hint(format!(
        "use DROP {} IF EXISTS to ignore a missing one",
        kind.to_uppercase()
    ))
}

/// Views that read `name`, directly or through other views, dependants last.
fn dependants_of(weir: &Weir, name: &str) -> Vec<String> {
    let views = weir.open_views();
    let mut found: Vec<String> = Vec::new();
    let mut frontier = vec![name.to_string()];
    while let Some(n) = frontier.pop() {
        for v in &views {
            if v.depends_on.contains(&n) && !found.contains(&v.relation.name) {
                found.push(v.relation.name.clone());
                frontier.push(v.relation.name.clone());
            }
        }
    }
    found
}

/// 2BP01 when views read `name`, unless `cascade`, which drops them (dependants first).
fn drop_dependants(weir: &Weir, name: &str, cascade: bool, kind: &str) -> WeirResult<()> {
    let dependants = dependants_of(weir, name);
    if dependants.is_empty() {
        return Ok(());
    }
    if !cascade {
        return Err(WeirError::new(
            SqlState("2BP01"),
            format!("cannot drop {kind} \"{name}\" because other objects depend on it"),
        )
        .with_detail(format!("materialized views: {}", dependants.join(", ")))
        .with_hint("drop the views first, or use DROP ... CASCADE to drop them too"));
    }
    for view in dependants.iter().rev() {
        drop_view(weir, view)?;
    }
    Ok(())
}

fn drop_view(weir: &Weir, name: &str) -> WeirResult<()> {
    weir.inner.catalog.drop_relation(name)?;
    weir.deregister_relation(name);
    // Dropping the handle stops the dataflow.
    weir.lock_views().remove(name);
    Ok(())
}

/// Relations DROP TABLE / DROP TOPIC must check: views reading them.
pub(super) fn refuse_if_read(weir: &Weir, name: &str, kind: &str) -> WeirResult<()> {
    drop_dependants(weir, name, false, kind)
}

/// A `CREATE SOURCE` checked and planned.
struct SourceDefinition {
    schema: SchemaRef,
    nexmark: Option<NexmarkConfig>,
    format: SourceFormat,
    watermark: Option<WatermarkSpec>,
    watermark_text: Option<String>,
    topic_name: Option<String>,
    topic_options: Options,
}

async fn source_definition(weir: &Weir, statement: &WeirStatement) -> WeirResult<SourceDefinition> {
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
                Some(Expr::Literal(ScalarValue::IntervalMonthDayNano(Some(v)), _))
                    if v.months == 0 =>
                {
                    i64::from(v.days) * 86_400_000_000_000 + v.nanoseconds
                }
                Some(Expr::Literal(ScalarValue::IntervalDayTime(Some(v)), _)) => {
                    i64::from(v.days) * 86_400_000_000_000 + i64::from(v.milliseconds) * 1_000_000
                }
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

/// Plans a view's query: the optimised plan and the relations it reads.
async fn plan_view(weir: &Weir, query: &str) -> WeirResult<(LogicalPlan, BTreeSet<String>)> {
    let parsed = weir.inner.parser.parse_sql(query)?;
    let [stmt] = parsed.as_slice() else {
        return Err(WeirError::new(
            SqlState::SYNTAX_ERROR,
            "a materialized view is defined by one query",
        ));
    };
    if !matches!(stmt, ast::Statement::Query(_)) {
        return Err(WeirError::new(
            SqlState::SYNTAX_ERROR,
            "a materialized view is defined by a SELECT query",
        ));
    }
    let state = weir.inner.ctx.state();
    let plan = state
        .statement_to_plan(ddl::df_statement(stmt))
        .await
        .map_err(|e| from_datafusion(e, query))?;
    let plan = state
        .optimize(&plan)
        .map_err(|e| from_datafusion(e, query))?;
    let mut depends_on = BTreeSet::new();
    collect_relations(&plan, &mut depends_on)?;
    Ok((plan, depends_on))
}

fn collect_relations(plan: &LogicalPlan, out: &mut BTreeSet<String>) -> WeirResult<()> {
    if let LogicalPlan::TableScan(scan) = plan {
        let provider = datafusion::catalog::default_table_source::source_as_provider(&scan.source)
            .map_err(|e| WeirError::internal(e.to_string()))?;
        match provider.downcast_ref::<WindowTable>() {
            Some(w) => out.insert(w.input_name.clone()),
            None => out.insert(scan.table_name.table().to_string()),
        };
    }
    for input in plan.inputs() {
        collect_relations(input, out)?;
    }
    Ok(())
}

/// The engine side of the streaming compiler: inputs for sources and tables, plans of views.
struct Inputs<'a> {
    weir: &'a Weir,
}

impl StreamCatalog for Inputs<'_> {
    fn resolve(
        &self,
        name: &str,
        builder: &mut DataflowBuilder,
        drop_late: bool,
    ) -> WeirResult<Resolved> {
        if let Some(source) = self.weir.lock_sources().get(name).cloned() {
            let at = builder.input(
                name,
                source.reader()?,
                source.watermark,
                drop_late,
                Some(source.stats.clone()),
            );
            return Ok(Resolved::Input {
                at,
                append_only: true,
            });
        }
        if let Some(table) = self.weir.lock_tables().get(name).cloned() {
            let source = TableSource::new(table.log(), table.schema(), table.changed());
            let append_only = source.append_only();
            let at = builder.input(name, Box::new(source), None, false, None);
            return Ok(Resolved::Input { at, append_only });
        }
        if let Some(view) = self.weir.lock_views().get(name).cloned() {
            return Ok(Resolved::View {
                plan: view.plan.clone(),
                emit_on_window_close: view.emit_on_window_close,
            });
        }
        Err(WeirError::unsupported(
            format!("\"{name}\" cannot be read by a materialized view"),
            "materialized views read sources, tables and other materialized views; create a source over a topic to read it",
        ))
    }
}

fn build_dataflow(
    weir: &Weir,
    plan: &LogicalPlan,
    emit_on_window_close: bool,
    text: &str,
    parallelism: usize,
) -> WeirResult<crate::stream::Dataflow> {
    let state = weir.inner.ctx.state();
    compile(
        plan,
        emit_on_window_close,
        &Inputs { weir },
        &state,
        text,
        parallelism,
    )
}

/// Ends a view's stored definition with the parallelism it was created with (a comment, so the
/// text stays a valid statement).
const PARALLELISM_MARK: &str = "\n-- weir: streaming_parallelism = ";

/// The default `streaming_parallelism`: the machine's cores.
pub(super) fn default_parallelism() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `SET streaming_parallelism` values: 1 to 64.
pub(super) fn parse_parallelism(value: &str) -> WeirResult<usize> {
    match value.trim().trim_matches('\'').parse::<usize>() {
        Ok(n) if (1..=64).contains(&n) => Ok(n),
        _ => Err(WeirError::new(
            SqlState::INVALID_PARAMETER_VALUE,
            format!("invalid value for streaming_parallelism: \"{value}\""),
        )
        .with_hint("use a whole number from 1 to 64")),
    }
}

fn nullable(schema: &Schema) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ))
}

fn start_view(
    weir: &Weir,
    relation: Relation,
    plan: LogicalPlan,
    emit_on_window_close: bool,
    depends_on: BTreeSet<String>,
    dataflow: crate::stream::Dataflow,
) -> WeirResult<()> {
    // The view's columns are the query's, without qualifiers.
    let schema = nullable(plan.schema().as_arrow());
    let state = ZSetState::try_new(schema.clone(), Vec::new())?;
    let output = ViewOutput {
        state: Arc::new(Mutex::new(state)),
        progress: Arc::new(Mutex::new(Progress::default())),
    };
    let running = dataflow.start(&relation.name, output.clone())?;
    let handle = Arc::new(ViewHandle {
        relation: relation.clone(),
        schema,
        plan,
        emit_on_window_close,
        depends_on,
        output,
        running,
    });
    weir.register_relation(
        &relation.name,
        Arc::new(ViewTable {
            view: handle.clone(),
        }),
    )?;
    weir.lock_views().insert(relation.name.clone(), handle);
    Ok(())
}

/// Opens a view from its catalog entry on start: re-planned and rebuilt from its inputs.
pub(super) async fn open_view(weir: &Weir, relation: Relation) -> WeirResult<()> {
    let statement = match weir.parse(&relation.sql)?.pop() {
        Some(crate::sql::Statement::Weir(w)) => w,
        _ => {
            return Err(WeirError::internal(
                "view definition is not CREATE MATERIALIZED VIEW",
            ));
        }
    };
    let WeirStatement::CreateMaterializedView {
        query,
        emit_on_window_close,
        ..
    } = statement
    else {
        return Err(WeirError::internal(
            "view definition is not CREATE MATERIALIZED VIEW",
        ));
    };
    let parallelism = relation
        .sql
        .rsplit_once(PARALLELISM_MARK)
        .and_then(|(_, n)| n.trim().parse().ok())
        .unwrap_or_else(default_parallelism);
    let query = match query.rsplit_once(PARALLELISM_MARK) {
        Some((q, _)) => q.to_string(),
        None => query,
    };
    let (plan, depends_on) = plan_view(weir, &query).await?;
    let dataflow = build_dataflow(weir, &plan, emit_on_window_close, &query, parallelism)?;
    start_view(
        weir,
        relation,
        plan,
        emit_on_window_close,
        depends_on,
        dataflow,
    )
}

/// A source as a relation: `SELECT` decodes its topic's retained history (bad messages are
/// skipped: they are in `weir_dead_letters`); `INSERT` encodes rows in the source's format and
/// publishes them.
struct SourceTable {
    source: Arc<SourceHandle>,
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
        let schema = nullable(&self.source.schema);
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

/// A materialized view's current rows.
struct ViewTable {
    view: Arc<ViewHandle>,
}

impl fmt::Debug for ViewTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ViewTable({})", self.view.relation.name)
    }
}

#[async_trait]
impl TableProvider for ViewTable {
    fn schema(&self) -> SchemaRef {
        self.view.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn DfSession,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let batches = self
            .view
            .output
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot();
        Ok(MemorySourceConfig::try_new_exec(
            &[batches],
            self.view.schema.clone(),
            projection.cloned(),
        )?)
    }
}
