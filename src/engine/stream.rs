//! The streaming statements: `CREATE SOURCE`, `CREATE MATERIALIZED VIEW`, their `DROP`s (with
//! the dependencies between views, sources and tables), `EXPLAIN CREATE MATERIALIZED VIEW` and
//! `FLUSH`, and the registry of open sources and views. `source.rs` and `view.rs` hold what
//! each kind of relation is made of.
//!
//! A source is a schema + format over a topic (its own, stored under `sources/<id>/`, or a
//! named topic). A view is its query planned by DataFusion, compiled by `plan::stream` into a
//! dataflow that runs on its own thread and keeps the view's `ZSetState`. Views are rebuilt
//! from the retained history on start (checkpoints come later), so `FLUSH` after a restart
//! waits for the rebuild.

use std::sync::Arc;

use arrow::array::{ArrayRef, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::TableProvider;

use super::session::Output;
use super::{Weir, queue};
use crate::catalog::RelationKind;
use crate::sql::WeirStatement;
use crate::stream::RunningDataflow;
use crate::types::{SqlState, WeirError, WeirResult};

use super::source::source_definition;
pub(super) use super::source::{SourceHandle, open_source, publish_rows};
use super::view::{CHECKPOINT_MARK, PARALLELISM_MARK, build_dataflow, plan_view, start_view};
pub(super) use super::view::{
    ViewHandle, default_parallelism, open_view, parse_checkpoint_interval, parse_parallelism,
};
impl Weir {
    pub(super) fn lock_sources(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Arc<SourceHandle>>> {
        self.inner.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn lock_views(
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
        for sink in self.open_sinks() {
            sink.running
                .flush()
                .await
                .map_err(|e| e.with_detail(format!("sink \"{}\"", sink.relation.name)))?;
        }
        Ok(())
    }

    /// `CHECKPOINT`: every view and sink takes a checkpoint now; returns when all are
    /// durable (and sinks have committed them). A stopped view's error is reported after
    /// the others have checkpointed.
    pub async fn checkpoint(&self) -> WeirResult<()> {
        let mut first_error = None;
        let mut handles = Vec::new();
        for view in self.open_views() {
            handles.push((
                format!("materialized view \"{}\"", view.relation.name),
                view.running.flush_handle(),
            ));
        }
        for sink in self.open_sinks() {
            handles.push((
                format!("sink \"{}\"", sink.relation.name),
                sink.running.flush_handle(),
            ));
        }
        for (what, handle) in handles {
            if let Err(e) = handle.checkpoint().await {
                first_error.get_or_insert(e.with_detail(what));
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The session settings streaming statements use.
pub(super) struct StreamSettings {
    /// `streaming_parallelism` for new views.
    pub parallelism: usize,
    /// `checkpoint_interval` for new views and sinks; `None`: the server's.
    pub checkpoint_interval_ms: Option<u64>,
}

/// Runs one of the streaming statements.
pub(super) async fn execute(
    weir: &Weir,
    statement: &WeirStatement,
    settings: &StreamSettings,
) -> WeirResult<Output> {
    let parallelism = settings.parallelism;
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
            def.check_connector().await?; // a broker source connects once: fail here, not later
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
            if let Err(e) = open_source(weir, relation, true).await {
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
            if !exists_as(weir, name, RelationKind::Source, *if_exists)? {
                return Ok(command("DROP SOURCE"));
            }
            drop_dependants(weir, name, *cascade, "source")?;
            if let Some(relation) = weir.inner.catalog.drop_relation(name)? {
                weir.deregister_relation(name);
                weir.lock_sources().remove(name);
                let _ = std::fs::remove_dir_all(weir.storage_dir("sources", relation.id));
                let _ = std::fs::remove_dir_all(weir.storage_dir("checkpoints", relation.id));
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
            let mut sql = format!("{statement}{PARALLELISM_MARK}{parallelism}");
            if let Some(ms) = settings.checkpoint_interval_ms {
                sql.push_str(&format!("{CHECKPOINT_MARK}{ms}"));
            }
            let relation = weir
                .inner
                .catalog
                .create(name, RelationKind::MaterializedView, sql)?;
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
            if !exists_as(weir, name, RelationKind::MaterializedView, *if_exists)? {
                return Ok(command("DROP MATERIALIZED VIEW"));
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
        WeirStatement::Checkpoint => {
            weir.checkpoint().await?;
            Ok(command("CHECKPOINT"))
        }
        WeirStatement::CreateSink { .. } => {
            let _ddl = weir.inner.ddl.lock().await;
            super::sink::create_sink(weir, statement, settings.checkpoint_interval_ms).await?;
            Ok(command("CREATE SINK"))
        }
        WeirStatement::DropSink { name, if_exists } => {
            let _ddl = weir.inner.ddl.lock().await;
            if exists_as(weir, name, RelationKind::Sink, *if_exists)? {
                super::sink::drop_sink(weir, name)?;
            }
            Ok(command("DROP SINK"))
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

/// Whether `name` is a relation of `kind` to drop: 42809 if it is another kind, 42P01 if it
/// does not exist (unless `if_exists`, then `false`).
fn exists_as(weir: &Weir, name: &str, kind: RelationKind, if_exists: bool) -> WeirResult<bool> {
    match weir.inner.catalog.get(name) {
        Some(r) if r.kind == kind => Ok(true),
        Some(r) => Err(WeirError::new(
            SqlState("42809"),
            format!("\"{name}\" is not a {}", kind.noun()),
        )
        .with_hint(format!(
            "it is a {}; use DROP {}",
            r.kind.noun(),
            r.kind.noun().to_uppercase()
        ))),
        None if if_exists => Ok(false),
        None => Err(undefined(kind.noun(), name)),
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

/// 2BP01 when views or sinks read `name`, unless `cascade`, which drops them (dependants
/// first).
fn drop_dependants(weir: &Weir, name: &str, cascade: bool, kind: &str) -> WeirResult<()> {
    let dependants = dependants_of(weir, name);
    let mut sinks = super::sink::sinks_of(weir, name);
    for view in &dependants {
        sinks.extend(super::sink::sinks_of(weir, view));
    }
    if dependants.is_empty() && sinks.is_empty() {
        return Ok(());
    }
    if !cascade {
        let mut detail = Vec::new();
        if !dependants.is_empty() {
            detail.push(format!("materialized views: {}", dependants.join(", ")));
        }
        if !sinks.is_empty() {
            detail.push(format!("sinks: {}", sinks.join(", ")));
        }
        return Err(WeirError::new(
            SqlState("2BP01"),
            format!("cannot drop {kind} \"{name}\" because other objects depend on it"),
        )
        .with_detail(detail.join("; "))
        .with_hint("drop them first, or use DROP ... CASCADE to drop them too"));
    }
    for sink in &sinks {
        super::sink::drop_sink(weir, sink)?;
    }
    for view in dependants.iter().rev() {
        drop_view(weir, view)?;
    }
    Ok(())
}

fn drop_view(weir: &Weir, name: &str) -> WeirResult<()> {
    if let Some(relation) = weir.inner.catalog.get(name) {
        let _ = std::fs::remove_dir_all(weir.storage_dir("checkpoints", relation.id));
    }
    weir.inner.catalog.drop_relation(name)?;
    weir.deregister_relation(name);
    // Dropping the handle stops the dataflow.
    weir.lock_views().remove(name);
    rest_monitors(weir);
    Ok(())
}

/// A source's monitor rests while some view reads the source (that view records the same
/// counts, dead letters and late rows), and reads again once none does.
pub(super) fn rest_monitors(weir: &Weir) {
    for source in weir.open_sources() {
        let read = !dependants_of(weir, &source.relation.name).is_empty();
        source
            .monitor_paused
            .store(read, std::sync::atomic::Ordering::Release);
    }
}

/// Relations DROP TABLE / DROP TOPIC must check: views reading them.
pub(super) fn refuse_if_read(weir: &Weir, name: &str, kind: &str) -> WeirResult<()> {
    drop_dependants(weir, name, false, kind)
}
