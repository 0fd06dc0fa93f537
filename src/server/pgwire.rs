//! pgwire handlers: startup, simple and extended query, COPY, cancel.
//!
//! Each connection gets one engine [`Session`], kept in pgwire's per-client
//! session extensions. Statements run while holding a read guard on the
//! server's shutdown gate. Errors become `ErrorResponse`s with the engine's
//! SQLSTATE; pgwire discards to Sync after an extended-protocol error.

use std::fmt::Debug;
use std::sync::Arc;

use arrow_pg::datatypes::df::deserialize_parameters_with_server_types;
use arrow_pg::datatypes::{arrow_schema_to_pg_fields, encode_recordbatch, into_pg_type};
use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::physical_plan::memory::MemoryStream;
use futures::{Sink, SinkExt, Stream, StreamExt, TryStreamExt, stream};
use pgwire::api::auth::StartupHandler;
use pgwire::api::auth::noop::NoopStartupHandler;
use pgwire::api::cancel::{CancelHandler, DefaultCancelHandler};
use pgwire::api::copy::CopyHandler;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{CopyResponse, DescribePortalResponse, DescribeStatementResponse};
use pgwire::api::results::{FieldFormat, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, ConnectionHandle, ConnectionManager, ErrorHandler,
    PgWireServerHandlers, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use pgwire::messages::copy::{CopyData, CopyDone, CopyFail};
use pgwire::messages::data::DataRow;
use pgwire::messages::response::{CommandComplete, NoticeResponse};
use pgwire::messages::startup::ParameterStatus;
use pgwire::types::format::FormatOptions;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, RwLock};

use super::TaskHandle;
use crate::engine::{Output, Prepared, Session, Weir};
use crate::format::pgtext::{needs_pg_text, to_pg_text};
use crate::plan::from_datafusion;
use crate::types::{SqlState, WeirError};

/// Starts the accept loop; each connection runs in its own task, aborted
/// with the loop.
pub(super) fn serve(listener: TcpListener, weir: Weir, gate: Arc<RwLock<()>>) -> TaskHandle {
    let connections = Arc::new(ConnectionManager::new());
    let handlers = Arc::new(Handlers {
        service: Arc::new(Service { weir, gate }),
        startup: Arc::new(Startup {
            connections: connections.clone(),
        }),
        cancel: Arc::new(DefaultCancelHandler::new(connections)),
    });
    TaskHandle::spawn("pgwire-accept", async move {
        // Connection tasks live in this set, so aborting the loop ends them.
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((socket, peer)) => {
                        let _ = socket.set_nodelay(true);
                        let handlers = handlers.clone();
                        tasks.spawn(async move {
                            if let Err(e) = pgwire::tokio::process_socket(socket, None, handlers).await {
                                tracing::debug!(%peer, error = %e, "connection closed with an error");
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "accepting a connection failed"),
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
    })
}

struct Handlers {
    service: Arc<Service>,
    startup: Arc<Startup>,
    cancel: Arc<DefaultCancelHandler>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.service.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.service.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }

    fn copy_handler(&self) -> Arc<impl CopyHandler> {
        self.service.clone()
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        self.cancel.clone()
    }

    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        Arc::new(LogErrors)
    }
}

struct LogErrors;

impl ErrorHandler for LogErrors {
    fn on_error<C: ClientInfo>(&self, _client: &C, error: &mut PgWireError) {
        tracing::debug!(error = %error, "sending error to client");
    }
}

/// No authentication (trust, like the local PostgreSQL); registers the
/// connection for cancel requests and reports Weir's parameters.
struct Startup {
    connections: Arc<ConnectionManager>,
}

#[async_trait]
impl NoopStartupHandler for Startup {
    fn connection_manager(&self) -> Option<Arc<ConnectionManager>> {
        Some(self.connections.clone())
    }

    async fn post_startup<C>(
        &self,
        client: &mut C,
        _message: pgwire::messages::PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        // Later ParameterStatus values replace pgwire's defaults.
        let version = crate::engine::PG_VERSION;
        for (name, value) in [
            (
                "server_version",
                format!("{version} (Weir {})", env!("CARGO_PKG_VERSION")),
            ),
            ("DateStyle", "ISO, MDY".to_string()),
            ("TimeZone", "UTC".to_string()),
        ] {
            client
                .feed(PgWireBackendMessage::ParameterStatus(ParameterStatus::new(
                    name.to_string(),
                    value,
                )))
                .await?;
        }
        Ok(())
    }
}

/// Query, extended-query and COPY handling over the engine.
struct Service {
    weir: Weir,
    /// Shutdown gate: a read guard per running statement.
    gate: Arc<RwLock<()>>,
}

/// The connection's engine session. Locked for a whole statement; only this
/// connection's task uses it, so the lock is never contended.
type SharedSession = Mutex<Session>;

impl Service {
    fn session<C: ClientInfo>(&self, client: &C) -> Arc<SharedSession> {
        client
            .session_extensions()
            .get_or_insert_with(|| Mutex::new(self.weir.session()))
    }
}

pub(crate) fn to_pg_error(e: WeirError) -> PgWireError {
    if e.is_internal() {
        tracing::error!(error = %e, "internal error");
    }
    let mut info = ErrorInfo::new(
        "ERROR".to_string(),
        e.sqlstate.code().to_string(),
        e.message,
    );
    info.detail = e.detail;
    info.hint = e.hint;
    info.position = e.position.map(|p| p.to_string());
    PgWireError::UserError(Box::new(info))
}

fn error_info(e: WeirError) -> Box<ErrorInfo> {
    match to_pg_error(e) {
        PgWireError::UserError(info) => info,
        other => Box::new(ErrorInfo::new(
            "ERROR".to_string(),
            SqlState::INTERNAL_ERROR.code().to_string(),
            other.to_string(),
        )),
    }
}

/// Turns engine output into a pgwire response, sending side messages
/// (notices, parameter status) first.
async fn respond<C>(
    client: &mut C,
    output: Output,
    format: &Format,
    sql: &str,
) -> PgWireResult<Response>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    Ok(match output {
        Output::Rows { schema, stream } => {
            let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
            let fields = Arc::new(arrow_schema_to_pg_fields(&schema, format, Some(options))?);
            let sql = sql.to_string();
            let row_fields = fields.clone();
            let text_columns: Vec<usize> = fields
                .iter()
                .enumerate()
                .filter(|(i, f)| {
                    f.format() == FieldFormat::Text && needs_pg_text(schema.field(*i).data_type())
                })
                .map(|(i, _)| i)
                .collect();
            let rows = stream
                .map(move |batch| {
                    let rows: Box<dyn Iterator<Item = PgWireResult<_>> + Send + Sync> = match batch
                    {
                        Ok(batch) => {
                            encode_recordbatch(row_fields.clone(), pg_text(batch, &text_columns))
                        }
                        Err(e) => {
                            Box::new(std::iter::once(Err(to_pg_error(from_datafusion(e, &sql)))))
                        }
                    };
                    stream::iter(rows)
                })
                .flatten();
            let handle = client
                .session_extensions()
                .get::<Arc<ConnectionHandle>>()
                .map(|h| h.as_ref().clone());
            Response::Query(QueryResponse::new(fields, cancellable(rows, handle)))
        }
        Output::Command { tag, rows } => {
            let tag = match (tag.strip_suffix(" 0"), rows) {
                (Some(word), Some(n)) => Tag::new(word).with_oid(0).with_rows(n as usize),
                (None, Some(n)) => Tag::new(&tag).with_rows(n as usize),
                (_, None) => Tag::new(&tag),
            };
            Response::Execution(tag)
        }
        Output::TransactionStart => Response::TransactionStart(Tag::new("BEGIN")),
        Output::TransactionEnd { tag, notice } => {
            if let Some(notice) = notice {
                let info = ErrorInfo::new("WARNING".to_string(), "01000".to_string(), notice);
                client
                    .feed(PgWireBackendMessage::NoticeResponse(NoticeResponse::from(
                        info,
                    )))
                    .await?;
            }
            Response::TransactionEnd(Tag::new(&tag))
        }
        Output::SettingChanged { name, value } => {
            client
                .feed(PgWireBackendMessage::ParameterStatus(ParameterStatus::new(
                    name, value,
                )))
                .await?;
            Response::Execution(Tag::new("SET"))
        }
        Output::CopyIn { columns, .. } => {
            Response::CopyIn(CopyResponse::new(0, columns, stream::empty()))
        }
    })
}

/// Text-format columns whose Arrow spelling differs from PostgreSQL's (floats,
/// timestamps) are turned into PostgreSQL's text (see `format::pgtext`);
/// arrow-pg then sends that text as is, under the column's own type.
fn pg_text(batch: RecordBatch, columns: &[usize]) -> RecordBatch {
    if columns.is_empty() {
        return batch;
    }
    let mut arrays = batch.columns().to_vec();
    let mut fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    for &i in columns {
        arrays[i] = to_pg_text(&arrays[i]);
        fields[i] = Field::new(fields[i].name(), DataType::Utf8, true);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).unwrap_or(batch)
}

/// Rows are produced while pgwire sends them, after `do_query` returned and
/// pgwire stopped listening for a cancel request; this listens instead and
/// ends the stream with 57014 when the client cancels.
fn cancellable<S>(
    rows: S,
    handle: Option<Arc<ConnectionHandle>>,
) -> impl Stream<Item = PgWireResult<DataRow>> + Send + 'static
where
    S: Stream<Item = PgWireResult<DataRow>> + Send + 'static,
{
    let cancelled = async move {
        if let Some(handle) = handle {
            // A fresh sender: pgwire's own (for do_query) is spent by now. An
            // Err means the next statement replaced it: not a cancel.
            if handle.start_query().await.await.is_ok() {
                return;
            }
        }
        std::future::pending::<()>().await
    };
    stream::unfold(
        (Box::pin(rows), Box::pin(cancelled), false),
        |(mut rows, mut cancelled, done)| async move {
            if done {
                return None;
            }
            tokio::select! {
                biased;
                _ = &mut cancelled => {
                    let error = WeirError::new(
                        SqlState::QUERY_CANCELED,
                        "canceling statement due to user request",
                    );
                    Some((Err(to_pg_error(error)), (rows, cancelled, true)))
                }
                item = rows.next() => item.map(|item| (item, (rows, cancelled, false))),
            }
        },
    )
}

#[async_trait]
impl SimpleQueryHandler for Service {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let _running = self.gate.read().await;
        let shared = self.session(client);
        let mut session = shared.lock().await;
        let statements = match session.parse(query) {
            Ok(statements) => statements,
            Err(e) => {
                self.weir.count_statement_error();
                return Ok(vec![Response::Error(error_info(e))]);
            }
        };
        if statements.is_empty() {
            return Ok(vec![Response::EmptyQuery]);
        }
        let mut responses = Vec::with_capacity(statements.len());
        let last = statements.len() - 1;
        for (index, statement) in statements.into_iter().enumerate() {
            let result = match session.prepare(statement, query).await {
                Ok(prepared) => session.execute(&prepared, None).await,
                Err(e) => Err(e),
            };
            // Rows are streamed while pgwire sends them, after this loop; a
            // statement followed by others must finish (or fail) before the
            // next one runs.
            let result = match result {
                Ok(Output::Rows { schema, stream }) if index < last => collect_rows(schema, stream)
                    .await
                    .map_err(|e| from_datafusion(e, query)),
                other => other,
            };
            match result {
                Ok(output) => {
                    let copy = matches!(output, Output::CopyIn { .. });
                    responses.push(respond(client, output, &Format::UnifiedText, query).await?);
                    if copy {
                        break; // the rest of the text waits for the copy data
                    }
                }
                Err(e) => {
                    // PostgreSQL stops a multi-statement query at its first error.
                    responses.push(Response::Error(error_info(e)));
                    break;
                }
            }
        }
        Ok(responses)
    }
}

/// Runs a row stream to completion and keeps its batches.
async fn collect_rows(
    schema: datafusion::arrow::datatypes::SchemaRef,
    stream: datafusion::execution::SendableRecordBatchStream,
) -> datafusion::error::Result<Output> {
    let batches: Vec<RecordBatch> = stream.try_collect().await?;
    let stream = MemoryStream::try_new(batches, schema.clone(), None)?;
    Ok(Output::Rows {
        schema,
        stream: Box::pin(stream),
    })
}

/// The extended protocol's parsed statement: None for an empty query.
#[derive(Debug, Clone)]
pub struct ParsedStatement(Option<Prepared>);

struct Parser {
    weir: Weir,
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = ParsedStatement;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Self::Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut statements = self.weir.parse(sql).map_err(to_pg_error)?;
        if statements.len() > 1 {
            return Err(to_pg_error(WeirError::new(
                SqlState::SYNTAX_ERROR,
                "cannot insert multiple commands into a prepared statement",
            )));
        }
        let Some(statement) = statements.pop() else {
            return Ok(Some(ParsedStatement(None)));
        };
        let prepared = self
            .weir
            .prepare(statement, sql)
            .await
            .map_err(to_pg_error)?;
        Ok(Some(ParsedStatement(Some(prepared))))
    }

    fn get_parameter_types(&self, stmt: &Self::Statement) -> PgWireResult<Vec<Type>> {
        Ok(parameter_types(stmt))
    }

    fn get_result_schema(
        &self,
        stmt: &Self::Statement,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        let Some(prepared) = &stmt.0 else {
            return Ok(Vec::new());
        };
        arrow_schema_to_pg_fields(
            &prepared.schema,
            format.unwrap_or(&Format::UnifiedText),
            None,
        )
    }
}

/// Parameter types as PostgreSQL types; ones DataFusion cannot infer are
/// reported as text, which every client can send.
fn parameter_types(stmt: &ParsedStatement) -> Vec<Type> {
    let Some(prepared) = &stmt.0 else {
        return Vec::new();
    };
    prepared
        .param_types
        .iter()
        .map(|t| {
            t.as_ref()
                .and_then(|t| into_pg_type(t).ok())
                .unwrap_or(Type::TEXT)
        })
        .collect()
}

#[async_trait]
impl ExtendedQueryHandler for Service {
    type Statement = ParsedStatement;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        Arc::new(Parser {
            weir: self.weir.clone(),
        })
    }

    async fn do_describe_statement<C>(
        &self,
        _client: &mut C,
        target: &StoredStatement<Self::Statement>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let params = parameter_types(&target.statement);
        let fields = match &target.statement.0 {
            Some(p) => arrow_schema_to_pg_fields(&p.schema, &Format::UnifiedBinary, None)?,
            None => Vec::new(),
        };
        Ok(DescribeStatementResponse::new(params, fields))
    }

    async fn do_describe_portal<C>(
        &self,
        _client: &mut C,
        portal: &Portal<Self::Statement>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let fields = match &portal.statement.statement.0 {
            Some(p) => arrow_schema_to_pg_fields(&p.schema, &portal.result_column_format, None)?,
            None => Vec::new(),
        };
        Ok(DescribePortalResponse::new(fields))
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let _running = self.gate.read().await;
        let Some(prepared) = &portal.statement.statement.0 else {
            return Ok(Response::EmptyQuery);
        };
        let params = if prepared.param_types.is_empty() {
            None
        } else {
            let wire = parameter_types(&portal.statement.statement);
            let wire_refs: Vec<Option<&Type>> = wire.iter().map(Some).collect();
            let inferred: Vec<Option<&datafusion::arrow::datatypes::DataType>> =
                prepared.param_types.iter().map(Option::as_ref).collect();
            Some(deserialize_parameters_with_server_types(
                portal, &inferred, &wire_refs,
            )?)
        };
        let shared = self.session(client);
        let mut session = shared.lock().await;
        // The plan made at Parse is reused: executing a prepared statement
        // does not plan it again.
        let output = session
            .execute(prepared, params)
            .await
            .map_err(to_pg_error)?;
        respond(client, output, &portal.result_column_format, &prepared.text).await
    }
}

#[async_trait]
impl CopyHandler for Service {
    async fn on_copy_data<C>(&self, client: &mut C, copy_data: CopyData) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let shared = self.session(client);
        shared.lock().await.copy_data(&copy_data.data);
        Ok(())
    }

    async fn on_copy_done<C>(&self, client: &mut C, _done: CopyDone) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let _running = self.gate.read().await;
        let shared = self.session(client);
        let rows = shared.lock().await.copy_done().await.map_err(to_pg_error)?;
        let tag = Tag::new("COPY").with_rows(rows as usize);
        client
            .send(PgWireBackendMessage::CommandComplete(
                CommandComplete::from(tag),
            ))
            .await?;
        Ok(())
    }

    async fn on_copy_fail<C>(&self, client: &mut C, fail: CopyFail) -> PgWireError
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let shared = self.session(client);
        shared.lock().await.copy_fail();
        to_pg_error(
            WeirError::new(
                SqlState::QUERY_CANCELED,
                format!("COPY from stdin failed: {}", fail.message),
            )
            .with_detail("no rows were loaded"),
        )
    }
}
