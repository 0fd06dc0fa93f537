//! Sinks: `CREATE SINK name FROM view WITH (connector = ...)` sends a materialized view's
//! output out of Weir — Parquet files (local or S3), a built-in topic, RabbitMQ.
//!
//! A sink is a dataflow of its own: the view's query compiled again (as a view over a view
//! is), with the sink at its root instead of the view's rows. It reads the view's inputs
//! from their retained history, so a new sink writes the view's whole output, and it
//! checkpoints on its own: each epoch's output becomes visible when the epoch's checkpoint
//! is durable (two-phase commit through the [`Sink`] contract), so a crash at any moment
//! loses nothing and writes nothing twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use datafusion::common::tree_node::TreeNode;
use datafusion::logical_expr::LogicalPlan;

use super::view::{CHECKPOINT_MARK, build_dataflow, checkpointing};
use super::{Weir, view};
use crate::catalog::{Relation, RelationKind};
use crate::connector::api::Sink;
use crate::connector::builtin::TopicSink;
use crate::format::decode::SourceFormat;
use crate::sql::WeirStatement;
use crate::stream::{CheckpointHistory, Output, Progress, RunningDataflow};
use crate::types::{SqlState, WeirError, WeirResult};

/// Connectors `CREATE SINK` takes.
const CONNECTORS: &str = "parquet, builtin, rabbitmq";

/// An open sink.
pub struct SinkHandle {
    pub relation: Relation,
    /// The view it sends out.
    pub from: String,
    pub connector: String,
    /// `Sink::describe()`: what it writes to.
    pub target: String,
    pub delivery: &'static str,
    pub progress: Arc<Mutex<Progress>>,
    pub checkpoints: Arc<Mutex<CheckpointHistory>>,
    /// Dropping this stops the sink's dataflow.
    pub(super) running: RunningDataflow,
}

impl std::fmt::Debug for SinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SinkHandle({})", self.relation.name)
    }
}

impl Weir {
    pub(super) fn lock_sinks(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<SinkHandle>>> {
        self.inner.sinks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open sinks, sorted by name.
    pub(super) fn open_sinks(&self) -> Vec<Arc<SinkHandle>> {
        let mut v: Vec<_> = self.lock_sinks().values().cloned().collect();
        v.sort_by(|a, b| a.relation.name.cmp(&b.relation.name));
        v
    }
}

/// Whether a plan's output only ever inserts: no aggregate unless it emits on window close,
/// no table (tables update), and the same for the views it reads.
fn append_only(weir: &Weir, plan: &LogicalPlan, emit_on_window_close: bool) -> bool {
    let mut ok = true;
    let _ = plan.apply(|node| {
        match node {
            LogicalPlan::Aggregate(_) | LogicalPlan::Distinct(_) if !emit_on_window_close => {
                ok = false
            }
            LogicalPlan::TableScan(scan) => {
                let name = scan.table_name.table().to_string();
                if weir.lock_tables().contains_key(&name) {
                    ok = false;
                }
                if let Some(v) = weir.lock_views().get(&name).cloned()
                    && !append_only(weir, &v.plan, v.emit_on_window_close)
                {
                    ok = false;
                }
            }
            _ => {}
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    ok
}

/// The sink object a definition asks for (connecting, checking the target is writable).
async fn make_sink(
    weir: &Weir,
    name: &str,
    from: &str,
    options: &[(String, String)],
    format: Option<&str>,
) -> WeirResult<(Box<dyn Sink>, String, &'static str)> {
    let view =
        weir.lock_views()
            .get(from)
            .cloned()
            .ok_or_else(|| match weir.inner.catalog.get(from) {
                Some(r) => WeirError::new(
                    SqlState("42809"),
                    format!("\"{from}\" is a {}, not a materialized view", r.kind.noun()),
                )
                .with_hint("a sink sends out a materialized view: CREATE MATERIALIZED VIEW first"),
                None => WeirError::new(
                    SqlState::UNDEFINED_TABLE,
                    format!("materialized view \"{from}\" does not exist"),
                ),
            })?;
    let connector = options
        .iter()
        .find(|(k, _)| k == "connector")
        .map(|(_, v)| v.to_ascii_lowercase())
        .ok_or_else(|| {
            WeirError::new(
                SqlState::INVALID_PARAMETER_VALUE,
                "CREATE SINK needs a connector",
            )
            .with_hint(format!(
                "add WITH (connector = '...'); connectors: {CONNECTORS}"
            ))
        })?;
    let is_append_only = append_only(weir, &view.plan, view.emit_on_window_close);
    let schema = view.schema.clone();
    match connector.as_str() {
        "parquet" => {
            if format.is_some() {
                return Err(WeirError::new(
                    SqlState::INVALID_PARAMETER_VALUE,
                    "a parquet sink writes Parquet: FORMAT does not apply",
                )
                .with_hint("drop the FORMAT clause"));
            }
            let config = crate::connector::parquet::ParquetSinkConfig::from_options(options)?;
            if !is_append_only && !config.changelog {
                return Err(not_append_only(from));
            }
            let sink = crate::connector::parquet::ParquetSink::open(config, schema, name).await?;
            Ok((
                Box::new(sink),
                connector,
                "exactly once: files become visible when their checkpoint commits",
            ))
        }
        "builtin" => {
            let mut topic = None;
            for (k, v) in options {
                match k.as_str() {
                    "connector" => {}
                    "topic" => topic = Some(v.clone()),
                    other => {
                        return Err(WeirError::new(
                            SqlState::INVALID_PARAMETER_VALUE,
                            format!("unknown option \"{other}\" for connector 'builtin'"),
                        )
                        .with_hint("valid options: connector, topic"));
                    }
                }
            }
            let topic = topic.ok_or_else(|| {
                WeirError::new(
                    SqlState::INVALID_PARAMETER_VALUE,
                    "a builtin sink needs a topic",
                )
                .with_hint("add topic = 'name' (CREATE TOPIC it first)")
            })?;
            if !is_append_only {
                return Err(not_append_only(from));
            }
            let format = SourceFormat::parse(format.unwrap_or("JSON"))?;
            let topic = weir.topic_arc(&topic)?;
            Ok((
                Box::new(TopicSink::new(name, topic, format)),
                connector,
                "exactly once: messages are published when their checkpoint commits",
            ))
        }
        "rabbitmq" => {
            if !is_append_only {
                return Err(not_append_only(from));
            }
            let format = SourceFormat::parse(format.unwrap_or("JSON"))?;
            let sink = crate::connector::rabbitmq::RabbitSink::open(name, options, format).await?;
            Ok((
                Box::new(sink),
                connector,
                "at least once across a crash between a checkpoint and its publisher confirms (message_id <sink>-<epoch>-<n> lets consumers drop repeats); exactly once otherwise",
            ))
        }
        other => Err(WeirError::new(
            SqlState::INVALID_PARAMETER_VALUE,
            format!("unknown sink connector '{other}'"),
        )
        .with_hint(format!("valid connectors: {CONNECTORS}"))),
    }
}

fn not_append_only(view: &str) -> WeirError {
    WeirError::unsupported(
        format!("materialized view \"{view}\" updates its rows; this sink only appends"),
        "define the view WITH EMIT ON WINDOW CLOSE (each window's rows once, final), or for a \
         parquet sink add changelog = 'true' to write every change with an op column",
    )
}

/// `CREATE SINK`: checks everything, records it, starts it.
pub(super) async fn create_sink(
    weir: &Weir,
    statement: &WeirStatement,
    checkpoint_interval_ms: Option<u64>,
) -> WeirResult<()> {
    let WeirStatement::CreateSink {
        name,
        if_not_exists,
        ..
    } = statement
    else {
        return Err(WeirError::internal("not CREATE SINK"));
    };
    if weir.inner.catalog.get(name).is_some() {
        if *if_not_exists {
            return Ok(());
        }
        return Err(WeirError::new(
            SqlState::DUPLICATE_TABLE,
            format!("relation \"{name}\" already exists"),
        )
        .with_hint("choose another name, or DROP SINK first"));
    }
    let mut sql = statement.to_string();
    if let Some(ms) = checkpoint_interval_ms {
        sql.push_str(&format!("{CHECKPOINT_MARK}{ms}"));
    }
    let relation = weir.inner.catalog.create(name, RelationKind::Sink, sql)?;
    if let Err(e) = open_sink(weir, relation).await {
        let _ = weir.inner.catalog.drop_relation(name);
        return Err(e);
    }
    Ok(())
}

/// Opens a sink from its catalog entry (on `CREATE` and on start).
pub(super) async fn open_sink(weir: &Weir, relation: Relation) -> WeirResult<()> {
    let statement = match weir.parse(view::strip_marks(&relation.sql))?.pop() {
        Some(crate::sql::Statement::Weir(w)) => w,
        _ => return Err(WeirError::internal("sink definition is not CREATE SINK")),
    };
    let WeirStatement::CreateSink {
        from,
        options,
        format,
        ..
    } = &statement
    else {
        return Err(WeirError::internal("sink definition is not CREATE SINK"));
    };
    // Output names (files, message ids) carry the sink's id too, so a sink dropped and
    // created again under the same name never overwrites or repeats the old one's output.
    let output_name = format!("{}-{}", relation.name, relation.id);
    let (sink, connector, delivery) =
        make_sink(weir, &output_name, from, options, format.as_deref()).await?;
    let view = weir
        .lock_views()
        .get(from)
        .cloned()
        .ok_or_else(|| WeirError::internal("sink's view vanished"))?;
    let view_query = match weir.parse(view::strip_marks(&view.relation.sql))?.pop() {
        Some(crate::sql::Statement::Weir(WeirStatement::CreateMaterializedView {
            query, ..
        })) => view::strip_marks(&query).to_string(),
        _ => {
            return Err(WeirError::internal(
                "view definition is not CREATE MATERIALIZED VIEW",
            ));
        }
    };
    let parallelism = view::stored_parallelism(&view.relation.sql);
    let dataflow = build_dataflow(
        weir,
        &view.plan,
        view.emit_on_window_close,
        &view_query,
        parallelism,
    )?;
    let target = sink.describe();
    // The sink's state is the view's operators: a changed view definition is a new sink.
    let fingerprint = format!("{}\n{}", relation.sql, view.relation.sql);
    let (checkpointing, checkpoints) = checkpointing(weir, &relation, fingerprint);
    let progress = Arc::new(Mutex::new(Progress::default()));
    let running = dataflow.with_checkpoints(checkpointing).start_output(
        &format!("sink-{}", relation.name),
        Output::Sink(sink, progress.clone()),
    )?;
    let handle = Arc::new(SinkHandle {
        relation: relation.clone(),
        from: from.clone(),
        connector,
        target,
        delivery,
        progress,
        checkpoints,
        running,
    });
    weir.lock_sinks().insert(relation.name.clone(), handle);
    Ok(())
}

/// `DROP SINK`: stops it and forgets its checkpoints (its committed output stays).
pub(super) fn drop_sink(weir: &Weir, name: &str) -> WeirResult<()> {
    if let Some(relation) = weir.inner.catalog.drop_relation(name)? {
        weir.lock_sinks().remove(name);
        let _ = std::fs::remove_dir_all(weir.storage_dir("checkpoints", relation.id));
    }
    Ok(())
}

/// Sinks that send out `view`.
pub(super) fn sinks_of(weir: &Weir, view: &str) -> Vec<String> {
    weir.open_sinks()
        .iter()
        .filter(|s| s.from == view)
        .map(|s| s.relation.name.clone())
        .collect()
}
