//! Materialized views: planning a view's query, compiling it into a dataflow with the engine's
//! inputs (sources, tables, views inline), starting it, reopening it on start, and the relation
//! DataFusion sees for it ([`ViewTable`]: the view's current rows). The statements themselves
//! are dispatched in `stream.rs`.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex};

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session as DfSession, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::sql::sqlparser::ast;

use super::table::nullable;
use super::{Weir, ddl};
use crate::catalog::Relation;
use crate::connector::api::Source;
use crate::connector::builtin::TableSource;
use crate::plan::from_datafusion;
use crate::plan::stream::{Resolved, StreamCatalog, compile};
use crate::plan::window::WindowTable;
use crate::sql::WeirStatement;
use crate::state::CheckpointStore;
use crate::state::ZSetState;
use crate::stream::{
    CheckpointHistory, Checkpointing, DataflowBuilder, Progress, RunningDataflow, ViewOutput,
};
use crate::types::{SqlState, WeirError, WeirResult};

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
    /// Its checkpoints, for `weir_checkpoints`.
    pub checkpoints: Arc<Mutex<CheckpointHistory>>,
    /// Dropping this stops the view's dataflow.
    pub(super) running: RunningDataflow,
}

/// Plans a view's query: the optimised plan and the relations it reads.
pub(super) async fn plan_view(
    weir: &Weir,
    query: &str,
) -> WeirResult<(LogicalPlan, BTreeSet<String>)> {
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
                source.dataflow_reader(None)?,
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

pub(super) fn build_dataflow(
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
pub(super) const PARALLELISM_MARK: &str = "\n-- weir: streaming_parallelism = ";

/// Ends a view's or sink's stored definition with the checkpoint interval it was created with
/// (`SET checkpoint_interval`), in milliseconds.
pub(super) const CHECKPOINT_MARK: &str = "\n-- weir: checkpoint_interval_ms = ";

/// The checkpoint interval a stored definition asks for, or the server's.
pub(super) fn checkpoint_interval(weir: &Weir, sql: &str) -> std::time::Duration {
    sql.split(CHECKPOINT_MARK)
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .and_then(|ms| ms.trim().parse::<u64>().ok())
        .map_or(weir.inner.config.checkpoint_interval, |ms| {
            std::time::Duration::from_millis(ms.max(1))
        })
}

/// The parallelism a stored definition was created with.
pub(super) fn stored_parallelism(sql: &str) -> usize {
    sql.split(PARALLELISM_MARK)
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(default_parallelism)
}

/// A definition without the trailing settings marks.
pub(super) fn strip_marks(sql: &str) -> &str {
    let end = [PARALLELISM_MARK, CHECKPOINT_MARK]
        .iter()
        .filter_map(|m| sql.find(m))
        .min()
        .unwrap_or(sql.len());
    &sql[..end]
}

/// Where a dataflow's checkpoints live and how often it takes them.
pub(super) fn checkpointing(
    weir: &Weir,
    relation: &Relation,
    fingerprint: String,
) -> (Checkpointing, Arc<Mutex<CheckpointHistory>>) {
    let history = Arc::new(Mutex::new(CheckpointHistory::default()));
    let checkpointing = Checkpointing {
        store: CheckpointStore::new(weir.storage_dir("checkpoints", relation.id)),
        interval: checkpoint_interval(weir, &relation.sql),
        fingerprint: format!("weir {}\n{fingerprint}", env!("CARGO_PKG_VERSION")),
        history: history.clone(),
    };
    (checkpointing, history)
}

/// `SET checkpoint_interval` values: a duration from 10 ms to a day.
pub(super) fn parse_checkpoint_interval(value: &str) -> WeirResult<u64> {
    match crate::sql::parse_duration_ms(value.trim().trim_matches('\'')) {
        Ok(ms) if (10..=86_400_000).contains(&ms) => Ok(ms),
        _ => Err(WeirError::new(
            SqlState::INVALID_PARAMETER_VALUE,
            format!("invalid value for checkpoint_interval: \"{value}\""),
        )
        .with_hint("use a duration from 10ms to 1 day, e.g. '10s', '500ms' or '1min'")),
    }
}

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

pub(super) fn start_view(
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
    let (checkpointing, checkpoints) = checkpointing(weir, &relation, relation.sql.clone());
    let running = dataflow
        .with_checkpoints(checkpointing)
        .start(&relation.name, output.clone())?;
    let handle = Arc::new(ViewHandle {
        relation: relation.clone(),
        schema,
        plan,
        emit_on_window_close,
        depends_on,
        output,
        checkpoints,
        running,
    });
    weir.register_relation(
        &relation.name,
        Arc::new(ViewTable {
            view: handle.clone(),
        }),
    )?;
    weir.lock_views().insert(relation.name.clone(), handle);
    super::stream::rest_monitors(weir);
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
    let parallelism = stored_parallelism(&relation.sql);
    let query = strip_marks(&query).to_string();
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

/// A materialized view's current rows.
pub(super) struct ViewTable {
    pub(super) view: Arc<ViewHandle>,
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
