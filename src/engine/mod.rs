//! The [`Weir`] handle: opens the data directory, recovers the catalog and
//! every table from their logs, and runs statements for [`Session`]s.
//!
//! One file per statement kind (`ddl.rs`, `copy.rs`, `query` paths in
//! `session.rs`); shared machinery (the DataFusion context, table registry,
//! metrics) lives here. The engine never speaks a wire protocol: the server
//! turns its [`Output`]s into messages.

mod copy;
mod ddl;
mod dml;
mod pgfuncs;
mod queue;
mod session;
mod settings;
mod sink;
mod source;
mod stream;
mod system;
mod table;
mod view;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use datafusion::arrow::datatypes::DataType;
use datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::scalar::ScalarValue;
use datafusion_pg_catalog::pg_catalog::context::{PgCatalogContextProvider, Role};

pub use self::session::{Output, Prepared, Session};
pub use self::system::{SubscriptionPartitionStats, TopicPartitionStats};
pub use self::table::{TableStore, WeirTable};
use crate::catalog::{Catalog, RelationKind};
pub use crate::queue::subscription::Delivery;
pub use crate::queue::topic::{Message, Published};
use crate::queue::{LogConfig, LogError};
use crate::sql::SqlParser;
pub use crate::stream::TaskHandle;
use crate::types::{SqlState, WeirError, WeirResult};

/// The database name clients see (any name a client asks for maps to it).
pub const DATABASE_NAME: &str = "weir";
/// The PostgreSQL version Weir speaks (clients gate features on it).
pub const PG_VERSION: &str = "16.6";

/// `version()`: PostgreSQL-shaped so drivers that parse it keep working.
pub fn version_string() -> String {
    format!(
        "PostgreSQL {PG_VERSION} (Weir {}) on {}-{}, DataFusion {}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH,
        std::env::consts::OS,
        datafusion::DATAFUSION_VERSION
    )
}

/// Engine settings; limits carry their units in their names.
#[derive(Debug, Clone)]
pub struct WeirConfig {
    pub data_dir: PathBuf,
    /// Largest COPY FROM STDIN payload accepted in one statement.
    pub copy_bytes_max: usize,
    pub log: LogConfig,
    /// How often views and sinks checkpoint unless their definition says otherwise.
    pub checkpoint_interval: std::time::Duration,
}

impl WeirConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        WeirConfig {
            data_dir: data_dir.into(),
            copy_bytes_max: 1 << 30,
            log: LogConfig::default(),
            checkpoint_interval: std::time::Duration::from_secs(10),
        }
    }
}

/// Counters exported on `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    pub statements_total: AtomicU64,
    pub errors_total: AtomicU64,
}

/// Handle to an open database; cheap to clone, shared by all connections.
#[derive(Clone)]
pub struct Weir {
    inner: Arc<Inner>,
}

struct Inner {
    config: WeirConfig,
    catalog: Catalog,
    /// One DataFusion context for every session: it holds the `weir.public`
    /// schema (our tables), `pg_catalog` and `information_schema`.
    ctx: SessionContext,
    parser: SqlParser,
    /// Open tables by name; the same `Arc`s are registered in `ctx`.
    tables: Mutex<HashMap<String, Arc<TableStore>>>,
    /// Open topics by name (also registered in `ctx` as tables).
    topics: Mutex<HashMap<String, Arc<crate::queue::topic::Topic>>>,
    /// Open subscriptions by name.
    subscriptions: Mutex<HashMap<String, Arc<crate::queue::subscription::Subscription>>>,
    /// Open sources by name (also registered in `ctx`).
    sources: Mutex<HashMap<String, Arc<stream::SourceHandle>>>,
    /// Open materialized views by name (also registered in `ctx`); dropping one stops its
    /// dataflow.
    views: Mutex<HashMap<String, Arc<stream::ViewHandle>>>,
    /// Open sinks by name; dropping one stops its dataflow.
    sinks: Mutex<HashMap<String, Arc<sink::SinkHandle>>>,
    /// Tables, sources and views by name, for the TUMBLE/HOP table functions (which cannot
    /// reach `ctx`'s catalog synchronously). Shared with the functions registered in `ctx`.
    relations: Arc<Mutex<HashMap<String, Arc<dyn datafusion::catalog::TableProvider>>>>,
    /// Serialises DDL (catalog + registry + files change together). A tokio
    /// mutex: held across log opening on the blocking pool.
    ddl: tokio::sync::Mutex<()>,
    metrics: Metrics,
    /// Holds the data directory's lock file open (and locked) for our lifetime.
    _lock: fs::File,
}

impl std::fmt::Debug for Weir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weir")
            .field("data_dir", &self.inner.config.data_dir)
            .finish()
    }
}

impl Weir {
    /// Opens (or creates) the data directory and recovers every table.
    pub async fn open(config: WeirConfig) -> WeirResult<Weir> {
        let dir = config.data_dir.clone();
        let unusable = |e: std::io::Error| {
            WeirError::new(
                SqlState::IO_ERROR,
                format!("data directory {} is unusable: {e}", dir.display()),
            )
            .with_hint("pass a writable directory with --data-dir or WEIR_DATA_DIR")
        };
        fs::create_dir_all(dir.join("tables")).map_err(unusable)?;
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(unusable)?;
        lock.try_lock().map_err(|_| {
            WeirError::new(
                SqlState::IO_ERROR,
                format!(
                    "data directory {} is in use by another weir process",
                    dir.display()
                ),
            )
            .with_hint("stop the other process, or give this one its own --data-dir")
        })?;
        let catalog = Catalog::open(&dir)?;
        let relations: Arc<Mutex<HashMap<String, Arc<dyn datafusion::catalog::TableProvider>>>> =
            Arc::new(Mutex::new(HashMap::new()));
        let ctx = new_context()?;
        let lookup_relations = relations.clone();
        let lookup: crate::plan::window::RelationLookup = Arc::new(move |name: &str| {
            lookup_relations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(name)
                .cloned()
        });
        for (name, function) in crate::plan::window::WindowFunction::all(lookup) {
            // DataFusion looks table functions up by the name as written, not folded.
            let mut capitalised = name.to_string();
            capitalised[..1].make_ascii_uppercase();
            for spelling in [name.to_string(), name.to_ascii_uppercase(), capitalised] {
                ctx.register_udtf(&spelling, function.clone());
            }
        }
        let weir = Weir {
            inner: Arc::new(Inner {
                config,
                catalog,
                ctx,
                parser: SqlParser::new(),
                tables: Mutex::new(HashMap::new()),
                topics: Mutex::new(HashMap::new()),
                subscriptions: Mutex::new(HashMap::new()),
                sources: Mutex::new(HashMap::new()),
                views: Mutex::new(HashMap::new()),
                sinks: Mutex::new(HashMap::new()),
                relations,
                ddl: tokio::sync::Mutex::new(()),
                metrics: Metrics::default(),
                _lock: lock,
            }),
        };
        weir.register_system_tables()
            .map_err(|e| WeirError::internal(format!("registering system tables: {e}")))?;
        weir.recover().await?;
        Ok(weir)
    }

    async fn recover(&self) -> WeirResult<()> {
        let relations = self.inner.catalog.relations();
        // Topics before subscriptions, which need their topic open.
        for relation in relations.iter().filter(|r| r.kind == RelationKind::Topic) {
            queue::open_topic(self, relation.clone()).await?;
        }
        for relation in relations
            .iter()
            .filter(|r| r.kind == RelationKind::Subscription)
        {
            queue::open_subscription(self, relation.clone()).await?;
        }
        for relation in &relations {
            match relation.kind {
                RelationKind::Topic
                | RelationKind::Subscription
                | RelationKind::Source
                | RelationKind::Sink
                | RelationKind::MaterializedView => {}
                RelationKind::Table => {
                    let started = std::time::Instant::now();
                    let store = ddl::open_table(self, relation.clone()).await?;
                    tracing::info!(
                        table = %relation.name,
                        rows = store.num_rows(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "recovered table"
                    );
                }
            }
        }
        for relation in relations.iter().filter(|r| r.kind == RelationKind::Source) {
            stream::open_source(self, relation.clone(), false).await?;
        }
        // Views in creation order: a view reads only relations created before it.
        let mut views: Vec<_> = relations
            .iter()
            .filter(|r| r.kind == RelationKind::MaterializedView)
            .collect();
        views.sort_by_key(|r| r.id);
        for relation in views {
            stream::open_view(self, relation.clone()).await?;
        }
        for relation in relations.iter().filter(|r| r.kind == RelationKind::Sink) {
            sink::open_sink(self, relation.clone()).await?;
        }
        // Monitors last: the views above rested those of the sources they read.
        for source in self.open_sources() {
            source::start_monitor(self, &source)?;
        }
        ddl::remove_orphan_storage(self, &relations)?;
        Ok(())
    }

    /// Splits and parses statement text.
    pub fn parse(&self, text: &str) -> WeirResult<Vec<crate::sql::Statement>> {
        self.inner.parser.parse(text)
    }

    /// Counts a statement that failed before it could be prepared.
    pub fn count_statement_error(&self) {
        self.count_statement(true);
    }

    /// A new session (one per client connection).
    pub fn session(&self) -> Session {
        Session::new(self.clone())
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.config.data_dir
    }

    /// Makes every table's log durable (graceful shutdown).
    pub fn sync(&self) -> WeirResult<()> {
        let tables: Vec<_> = self.lock_tables().values().cloned().collect();
        for table in tables {
            table.sync()?;
        }
        for (_, topic) in self.open_topics() {
            topic.sync_all().map_err(queue::queue_error)?;
        }
        Ok(())
    }

    fn lock_tables(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<TableStore>>> {
        self.inner.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where a topic's or subscription's files live: `<data>/<kind>/<id>`.
    fn storage_dir(&self, kind: &str, id: u64) -> PathBuf {
        self.inner.config.data_dir.join(kind).join(id.to_string())
    }

    fn table_dir(&self, id: u64) -> PathBuf {
        self.inner
            .config
            .data_dir
            .join("tables")
            .join(id.to_string())
    }

    pub(crate) fn count_statement(&self, failed: bool) {
        let m = &self.inner.metrics;
        m.statements_total.fetch_add(1, Ordering::Relaxed);
        if failed {
            m.errors_total.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Converts a log error at the engine boundary.
pub(crate) fn log_error(e: LogError) -> WeirError {
    match e {
        LogError::Corrupt { .. } => WeirError::new(SqlState::DATA_CORRUPTED, e.to_string()),
        LogError::RecordTooLarge { .. } => {
            WeirError::new(SqlState::PROGRAM_LIMIT_EXCEEDED, e.to_string())
                .with_hint("split the change into smaller statements")
        }
        other => WeirError::new(SqlState::IO_ERROR, other.to_string()),
    }
}

/// The roles `pg_roles` (and psql's `\du`) list: Weir has no users yet and
/// trusts every connection, so there is the one superuser clients expect.
#[derive(Debug, Clone)]
struct Roles;

#[async_trait::async_trait]
impl PgCatalogContextProvider for Roles {
    async fn roles(&self) -> Vec<String> {
        vec!["postgres".to_string()]
    }

    async fn role(&self, name: &str) -> Option<Role> {
        (name == "postgres").then(|| Role {
            name: name.to_string(),
            is_superuser: true,
            can_login: true,
            can_create_db: true,
            can_create_role: true,
            can_create_user: true,
            can_replication: false,
            grants: Vec::new(),
            inherited_roles: Vec::new(),
        })
    }
}

fn new_context() -> WeirResult<SessionContext> {
    let config = SessionConfig::new()
        .with_default_catalog_and_schema(DATABASE_NAME, "public")
        .with_create_default_catalog_and_schema(true)
        .with_information_schema(true)
        // `0.1` is numeric in PostgreSQL, not a float.
        .set_bool("datafusion.sql_parser.parse_float_as_decimal", true);
    let ctx = SessionContext::new_with_config(config);
    datafusion_pg_catalog::setup_pg_catalog(&ctx, DATABASE_NAME, Roles)
        .map_err(|e| WeirError::internal(format!("setting up pg_catalog: {e}")))?;
    pgfuncs::register(&ctx);
    let version = version_string();
    ctx.register_udf(create_udf(
        "version",
        vec![],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(move |_args: &[ColumnarValue]| {
            Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(
                version.clone(),
            ))))
        }),
    ));
    Ok(ctx)
}
