//! [`Session`]: one client's state (settings, transaction block, a pending
//! COPY) and the dispatch of each statement kind.
//!
//! Life of a statement here: [`Session::parse`] → [`Session::prepare`]
//! (plans DataFusion statements once, so the extended protocol can describe
//! parameters and result columns) → [`Session::execute`] → an [`Output`].

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::ParamValues;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::sql::sqlparser::ast::{
    Expr, ObjectType, Set, Statement as SqlStatement, TruncateTableTarget, Value, ValueWithSpan,
};
use futures::TryStreamExt;

use super::copy::{self, PendingCopy};
use super::ddl::{self, df_statement};
use super::dml;
use super::queue;
use super::settings;
use super::{Weir, version_string};
use crate::plan::{Kind, classify, from_datafusion, parameter_types, pg_column_names};
use crate::sql::{Statement, WeirStatement};
use crate::types::{SqlState, WeirError, WeirResult};

/// What a statement produced, for the server to put on the wire.
pub enum Output {
    /// Rows to stream; `tag` is the command tag word (`SELECT`, `SHOW`, ...).
    Rows {
        schema: SchemaRef,
        stream: SendableRecordBatchStream,
    },
    /// A command that returns no rows, with its PostgreSQL command tag.
    Command { tag: String, rows: Option<u64> },
    /// `BEGIN`.
    TransactionStart,
    /// `COMMIT`/`ROLLBACK`; `notice` warns about what a block could not do.
    TransactionEnd { tag: String, notice: Option<String> },
    /// A setting changed that the client must be told about (ParameterStatus).
    SettingChanged { name: String, value: String },
    /// `COPY ... FROM STDIN` is waiting for data: the server feeds
    /// [`Session::copy_data`] and then calls [`Session::copy_done`].
    CopyIn { columns: usize, csv: bool },
}

impl Output {
    /// Rows of one batch built from `columns` (SHOW, FETCH and other small
    /// results computed by the engine itself).
    pub(super) fn from_columns(schema: SchemaRef, columns: Vec<ArrayRef>) -> WeirResult<Output> {
        let batch = RecordBatch::try_new(schema.clone(), columns)
            .map_err(|e| WeirError::internal(format!("building result: {e}")))?;
        let stream = MemoryStream::try_new(vec![batch], schema.clone(), None)
            .map_err(|e| WeirError::internal(format!("building result: {e}")))?;
        Ok(Output::Rows {
            schema,
            stream: Box::pin(stream),
        })
    }
}

/// A parsed and (for DataFusion statements) planned statement.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub statement: Statement,
    pub text: String,
    kind: Kind,
    plan: Option<LogicalPlan>,
    /// Result columns (empty for commands).
    pub schema: SchemaRef,
    /// Inferred type of `$1`, `$2`, ... (None where DataFusion cannot tell).
    pub param_types: Vec<Option<DataType>>,
    /// Set for an INSERT into a topic that is a plain publish: run directly.
    publish: Option<queue::FastPublish>,
}

/// Where the session stands with respect to a transaction block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    None,
    /// Inside BEGIN; counts statements that changed data (already applied).
    Open {
        writes: usize,
    },
    /// A statement in the block failed: only COMMIT/ROLLBACK are accepted.
    Failed,
}

/// One client's session.
pub struct Session {
    weir: Weir,
    /// This session's consumer id in subscriptions (unique per server run).
    consumer: String,
    settings: BTreeMap<String, String>,
    block: Block,
    copy: Option<PendingCopy>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.weir
            .metrics()
            .connections_active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn empty_schema() -> SchemaRef {
    Arc::new(Schema::empty())
}

impl Session {
    pub(super) fn new(weir: Weir) -> Session {
        let m = weir.metrics();
        m.connections_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        m.connections_active
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        static NEXT_SESSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT_SESSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Session {
            weir,
            consumer: format!("session-{id}"),
            settings: settings::defaults(),
            block: Block::None,
            copy: None,
        }
    }

    pub fn weir(&self) -> &Weir {
        &self.weir
    }

    /// Splits and parses statement text.
    pub fn parse(&self, text: &str) -> WeirResult<Vec<Statement>> {
        self.weir.inner.parser.parse(text)
    }

    /// Plans a statement for this session; inside a failed transaction
    /// block only COMMIT/ROLLBACK get through, and a failure fails the block.
    pub async fn prepare(&mut self, statement: Statement, text: &str) -> WeirResult<Prepared> {
        let ends_block = ends_block(&statement);
        if self.block == Block::Failed && !ends_block {
            self.weir.count_statement(true);
            return Err(aborted_block());
        }
        let result = self.weir.prepare(statement, text).await;
        if result.is_err() {
            self.weir.count_statement(true);
            if matches!(self.block, Block::Open { .. }) {
                self.block = Block::Failed;
            }
        }
        result
    }

    /// Runs a prepared statement with optional parameter values.
    pub async fn execute(
        &mut self,
        prepared: &Prepared,
        params: Option<ParamValues>,
    ) -> WeirResult<Output> {
        let ends_block = ends_block(&prepared.statement);
        if self.block == Block::Failed && !ends_block {
            return Err(aborted_block());
        }
        let result = self.execute_inner(prepared, params).await;
        self.weir.count_statement(result.is_err());
        match (&result, &mut self.block) {
            (Err(_), Block::Open { .. }) => self.block = Block::Failed,
            (Ok(Output::Command { .. }), Block::Open { writes })
                if prepared.kind != Kind::Query && prepared.kind != Kind::Utility =>
            {
                *writes += 1
            }
            _ => {}
        }
        result
    }

    async fn execute_inner(
        &mut self,
        prepared: &Prepared,
        params: Option<ParamValues>,
    ) -> WeirResult<Output> {
        if prepared.kind != Kind::Utility {
            return self.execute_planned(prepared, params).await;
        }
        let weir = self.weir.clone();
        let text = &prepared.text;
        let statement = match &prepared.statement {
            Statement::Weir(
                w @ (WeirStatement::CreateSource { .. }
                | WeirStatement::DropSource { .. }
                | WeirStatement::CreateMaterializedView { .. }
                | WeirStatement::DropMaterializedView { .. }
                | WeirStatement::ExplainMaterializedView { .. }
                | WeirStatement::CreateSink { .. }
                | WeirStatement::DropSink { .. }
                | WeirStatement::Checkpoint
                | WeirStatement::Flush),
            ) => {
                let parallelism = match self.settings.get("streaming_parallelism") {
                    Some(v) => super::stream::parse_parallelism(v)?,
                    None => super::stream::default_parallelism(),
                };
                let checkpoint_interval_ms = match self.settings.get("checkpoint_interval") {
                    Some(v) => Some(super::stream::parse_checkpoint_interval(v)?),
                    None => None,
                };
                let settings = super::stream::StreamSettings {
                    parallelism,
                    checkpoint_interval_ms,
                };
                return super::stream::execute(&weir, w, &settings).await;
            }
            Statement::Weir(w) => return queue::execute(&weir, &self.consumer, w).await,
            Statement::Sql(s) => s.as_ref(),
        };
        match statement {
            SqlStatement::CreateTable(_) => {
                ddl::create_table(&weir, text, statement).await?;
                Ok(command("CREATE TABLE"))
            }
            SqlStatement::Drop {
                object_type: ObjectType::Table,
                if_exists,
                names,
                ..
            } => {
                ddl::drop_tables(&weir, names, *if_exists).await?;
                Ok(command("DROP TABLE"))
            }
            SqlStatement::Truncate(truncate) => self.truncate(&truncate.table_names).await,
            SqlStatement::Copy { .. } => {
                let pending = copy::start(&weir, statement)?;
                let columns = pending.num_columns();
                let csv = matches!(pending.format, crate::format::copy::CopyFormat::Csv { .. });
                self.copy = Some(pending);
                Ok(Output::CopyIn { columns, csv })
            }
            SqlStatement::StartTransaction { .. } => {
                if self.block == Block::None {
                    self.block = Block::Open { writes: 0 };
                }
                Ok(Output::TransactionStart)
            }
            SqlStatement::Commit { .. } => Ok(self.end_block(false)),
            SqlStatement::Rollback { .. } => Ok(self.end_block(true)),
            SqlStatement::Set(set) => self.set(set),
            SqlStatement::ShowVariable { .. } => self.show(prepared),
            SqlStatement::Discard { .. } => Ok(command("DISCARD ALL")),
            SqlStatement::Deallocate { .. } => Ok(command("DEALLOCATE")),
            other => Err(unsupported_statement(other)),
        }
    }

    async fn execute_planned(
        &mut self,
        prepared: &Prepared,
        params: Option<ParamValues>,
    ) -> WeirResult<Output> {
        let text = &prepared.text;
        if let Some(publish) = &prepared.publish {
            let rows = publish.run(&self.weir, params.as_ref()).await?;
            return Ok(Output::Command {
                tag: "INSERT 0".to_string(),
                rows: Some(rows),
            });
        }
        // UPDATE/DELETE were planned by DataFusion to check them and infer
        // parameter types; they run as a SELECT plus one change (see dml.rs).
        let sql = match &prepared.statement {
            Statement::Sql(sql) => sql.as_ref(),
            Statement::Weir(_) => {
                return Err(WeirError::internal("Weir statement planned by DataFusion"));
            }
        };
        match sql {
            SqlStatement::Update(update) => {
                let rows = dml::update(&self.weir, update, params.as_ref(), text).await?;
                return Ok(Output::Command {
                    tag: "UPDATE".to_string(),
                    rows: Some(rows),
                });
            }
            SqlStatement::Delete(delete) => {
                let rows = dml::delete(&self.weir, delete, params.as_ref(), text).await?;
                return Ok(Output::Command {
                    tag: "DELETE".to_string(),
                    rows: Some(rows),
                });
            }
            _ => {}
        }
        let plan = prepared
            .plan
            .clone()
            .ok_or_else(|| WeirError::internal("planned statement without a plan"))?;
        let plan = match params {
            Some(values) => plan
                .replace_params_with_values(&values)
                .map_err(|e| from_datafusion(e, text))?,
            None => plan,
        };
        let ctx = &self.weir.inner.ctx;
        let frame = ctx
            .execute_logical_plan(plan)
            .await
            .map_err(|e| from_datafusion(e, text))?;
        if prepared.kind == Kind::Query {
            let schema = prepared.schema.clone();
            let stream = frame
                .execute_stream()
                .await
                .map_err(|e| from_datafusion(e, text))?;
            return Ok(Output::Rows { schema, stream });
        }
        let batches: Vec<RecordBatch> = frame
            .execute_stream()
            .await
            .map_err(|e| from_datafusion(e, text))?
            .try_collect()
            .await
            .map_err(|e| from_datafusion(e, text))?;
        let rows = batches
            .first()
            .and_then(|b| b.column_by_name("count"))
            .and_then(|c| c.as_any().downcast_ref::<UInt64Array>())
            .map(|a| a.value(0))
            .unwrap_or(0);
        Ok(Output::Command {
            tag: "INSERT 0".to_string(),
            rows: Some(rows),
        })
    }

    async fn truncate(&mut self, targets: &[TruncateTableTarget]) -> WeirResult<Output> {
        let stores = targets
            .iter()
            .map(|t| ddl::lookup(&self.weir, &t.name))
            .collect::<WeirResult<Vec<_>>>()?;
        for store in stores {
            store.truncate().await?;
        }
        Ok(command("TRUNCATE TABLE"))
    }

    fn end_block(&mut self, rollback: bool) -> Output {
        let previous = std::mem::replace(&mut self.block, Block::None);
        let notice = match previous {
            Block::Open { writes } if rollback && writes > 0 => Some(format!(
                "ROLLBACK did not undo {writes} statement(s): Weir applies each statement durably when it completes"
            )),
            Block::None => Some("there is no transaction in progress".to_string()),
            _ => None,
        };
        // A failed block ends in ROLLBACK whatever the client sent.
        let tag = if rollback || previous == Block::Failed {
            "ROLLBACK"
        } else {
            "COMMIT"
        };
        Output::TransactionEnd {
            tag: tag.to_string(),
            notice,
        }
    }

    fn set(&mut self, set: &Set) -> WeirResult<Output> {
        let (name, value) = match set {
            Set::SingleAssignment {
                variable, values, ..
            } => {
                let name = variable.to_string().to_lowercase();
                let value = values
                    .iter()
                    .map(setting_value)
                    .collect::<Vec<_>>()
                    .join(", ");
                (name, value)
            }
            Set::SetTimeZone { value, .. } => ("timezone".to_string(), setting_value(value)),
            Set::SetNames { charset_name, .. } => {
                ("client_encoding".to_string(), charset_name.to_string())
            }
            Set::SetTransaction { .. } | Set::SetSessionAuthorization(_) => {
                return Ok(command("SET"));
            }
            other => {
                return Err(WeirError::unsupported(
                    format!("{other} is not supported"),
                    "use SET name = value",
                ));
            }
        };
        let value = match (name.as_str(), value.to_lowercase().as_str()) {
            (_, "default") => settings::defaults().get(&name).cloned().unwrap_or_default(),
            ("client_encoding", "utf8" | "utf-8" | "unicode") => "UTF8".to_string(),
            ("client_encoding", _) => {
                return Err(WeirError::new(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    format!("client encoding \"{value}\" is not supported"),
                )
                .with_hint("Weir speaks UTF8 only: SET client_encoding = 'UTF8'"));
            }
            ("streaming_parallelism", _) => super::stream::parse_parallelism(&value)?.to_string(),
            ("checkpoint_interval", _) => {
                format!("{}ms", super::stream::parse_checkpoint_interval(&value)?)
            }
            _ => value,
        };
        self.settings.insert(name.clone(), value.clone());
        if settings::REPORTED.contains(&name.as_str()) {
            Ok(Output::SettingChanged {
                name: settings::reported_name(&name),
                value,
            })
        } else {
            Ok(command("SET"))
        }
    }

    fn show(&self, prepared: &Prepared) -> WeirResult<Output> {
        let name = prepared.schema.field(0).name().clone();
        let columns: Vec<ArrayRef> = if prepared.schema.fields().len() == 2 {
            let names: Vec<&str> = self.settings.keys().map(String::as_str).collect();
            let values: Vec<&str> = self.settings.values().map(String::as_str).collect();
            vec![
                Arc::new(StringArray::from(names)),
                Arc::new(StringArray::from(values)),
            ]
        } else {
            let value = match self.settings.get(&name) {
                Some(v) => v.clone(),
                None if name == "server_version_full" => version_string(),
                None => {
                    return Err(WeirError::new(
                        SqlState::UNDEFINED_OBJECT,
                        format!("unrecognized configuration parameter \"{name}\""),
                    )
                    .with_hint("SHOW ALL lists the parameters"));
                }
            };
            vec![Arc::new(StringArray::from(vec![value]))]
        };
        Output::from_columns(prepared.schema.clone(), columns)
    }

    /// Feeds client data to the pending COPY.
    pub fn copy_data(&mut self, chunk: &[u8]) {
        let limit = self.weir.inner.config.copy_bytes_max;
        if let Some(copy) = &mut self.copy {
            copy.push(chunk, limit);
        }
    }

    /// Ends the pending COPY: decodes and inserts everything; returns rows.
    pub async fn copy_done(&mut self) -> WeirResult<u64> {
        let Some(pending) = self.copy.take() else {
            return Err(WeirError::new(
                SqlState::PROTOCOL_VIOLATION,
                "COPY data received but no COPY is in progress",
            ));
        };
        let limit = self.weir.inner.config.copy_bytes_max;
        let result = copy::finish(&self.weir, pending, limit).await;
        self.weir.count_statement(result.is_err());
        if result.is_err() && matches!(self.block, Block::Open { .. }) {
            self.block = Block::Failed;
        }
        result
    }

    /// Abandons the pending COPY (client sent CopyFail).
    pub fn copy_fail(&mut self) {
        self.copy = None;
    }
}

impl Weir {
    /// Plans a statement (DataFusion statements) or classifies it (Weir's own).
    pub async fn prepare(&self, statement: Statement, text: &str) -> WeirResult<Prepared> {
        // SHOW TOPICS / SHOW SUBSCRIPTIONS are queries over system relations.
        let statement = match &statement {
            Statement::Weir(w) => match queue::show_query(w) {
                Some(query) => match self.inner.parser.parse(query)?.pop() {
                    Some(parsed) => parsed,
                    None => return Err(WeirError::internal("empty SHOW query")),
                },
                None => statement,
            },
            Statement::Sql(_) => statement,
        };
        let sql = match &statement {
            Statement::Sql(sql) => sql.as_ref(),
            Statement::Weir(weir_statement) => {
                return Ok(Prepared {
                    schema: queue::result_schema(weir_statement),
                    statement,
                    text: text.to_string(),
                    kind: Kind::Utility,
                    plan: None,
                    param_types: Vec::new(),
                    publish: None,
                });
            }
        };
        let kind = classify(sql)?;
        if kind == Kind::Utility {
            let schema = match sql {
                SqlStatement::ShowVariable { variable } => {
                    let name = variable
                        .iter()
                        .map(|i| i.value.to_lowercase())
                        .collect::<Vec<_>>()
                        .join(" ");
                    if name == "all" {
                        Arc::new(Schema::new(vec![
                            Field::new("name", DataType::Utf8, false),
                            Field::new("setting", DataType::Utf8, false),
                        ]))
                    } else {
                        Arc::new(Schema::new(vec![Field::new(name, DataType::Utf8, false)]))
                    }
                }
                _ => empty_schema(),
            };
            return Ok(Prepared {
                statement,
                text: text.to_string(),
                kind,
                plan: None,
                schema,
                param_types: Vec::new(),
                publish: None,
            });
        }
        let state = self.inner.ctx.state();
        let plan = state
            .statement_to_plan(df_statement(sql))
            .await
            .map_err(|e| from_datafusion(e, text))?;
        let schema = if kind == Kind::Query {
            let planned = plan.schema().as_arrow().clone();
            match pg_column_names(sql, planned.fields().len()) {
                Some(names) => Arc::new(Schema::new(
                    planned
                        .fields()
                        .iter()
                        .zip(names)
                        .map(|(f, name)| match name {
                            Some(name) => f.as_ref().clone().with_name(name),
                            None => f.as_ref().clone(),
                        })
                        .collect::<Vec<_>>(),
                )),
                None => Arc::new(planned),
            }
        } else {
            empty_schema()
        };
        let param_types = parameter_types(&plan).map_err(|e| from_datafusion(e, text))?;
        let publish = match kind {
            Kind::Insert => queue::fast_publish(self, sql),
            _ => None,
        };
        Ok(Prepared {
            statement,
            text: text.to_string(),
            kind,
            plan: Some(plan),
            schema,
            param_types,
            publish,
        })
    }
}

/// COMMIT and ROLLBACK end a transaction block (and get through a failed one).
fn ends_block(statement: &Statement) -> bool {
    matches!(statement, Statement::Sql(s) if matches!(**s, SqlStatement::Commit { .. } | SqlStatement::Rollback { .. }))
}

fn aborted_block() -> WeirError {
    WeirError::new(
        SqlState("25P02"),
        "current transaction is aborted, commands ignored until end of transaction block",
    )
    .with_hint("send ROLLBACK to end the failed block")
}

fn command(tag: &str) -> Output {
    Output::Command {
        tag: tag.to_string(),
        rows: None,
    }
}

/// `SET x = 'a'` → `a`; `SET x = a` → `a`; numbers as written.
fn setting_value(expr: &Expr) -> String {
    match expr {
        Expr::Value(ValueWithSpan {
            value: Value::SingleQuotedString(s) | Value::DoubleQuotedString(s),
            ..
        }) => s.clone(),
        Expr::Identifier(ident) => ident.value.clone(),
        other => other.to_string(),
    }
}

fn unsupported_statement(stmt: &SqlStatement) -> WeirError {
    let text = stmt.to_string();
    let words: Vec<&str> = text.split_whitespace().take(2).collect();
    let head = words.join(" ").to_uppercase();
    let hint = match words.first().map(|w| w.to_uppercase()).as_deref() {
        Some("CREATE") if head.contains("VIEW") => {
            "views arrive with CREATE MATERIALIZED VIEW on streams; query tables directly for now"
        }
        Some("ALTER") => "drop and re-create the table with the new definition",
        Some("CREATE") => "Weir supports CREATE TABLE; see docs/sql.md",
        _ => "see docs/sql.md for the statements Weir supports",
    };
    WeirError::unsupported(format!("{head} is not supported"), hint)
}
