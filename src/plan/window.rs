//! `TUMBLE(relation, time_column, size)` and `HOP(relation, time_column, slide, size)` as
//! DataFusion table functions, and [`WindowTable`], the relation they return: the input's
//! columns plus `window_start` and `window_end`.
//!
//! In a batch query `WindowTable::scan` reads the input and assigns windows with the same
//! function the streaming operator uses; in `CREATE MATERIALIZED VIEW` the streaming compiler
//! recognises the scan and builds a window operator over the input's stream instead.
//! `SESSION(relation, time_column, gap [, key columns])` windows rows per key (or over the whole
//! relation) into sessions; see `stream::SessionOperator`.

use std::fmt;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableFunctionImpl, TableProvider};
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;

use crate::stream::{WindowKind, assign_sessions};

/// What kind of window a [`WindowTable`] assigns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowShape {
    /// TUMBLE or HOP: each row's windows follow from its own event time.
    Fixed(WindowKind),
    /// SESSION: rows closer than `gap_ns` (per key) share a window.
    Session { gap_ns: i64, keys: Vec<usize> },
}
use crate::types::{SqlState, WeirError};

/// Looks up the relation a window function reads, by name.
pub type RelationLookup = Arc<dyn Fn(&str) -> Option<Arc<dyn TableProvider>> + Send + Sync>;

/// An interval literal of days or less as nanoseconds; `None` for months, NULL, other types or
/// a value that does not fit.
pub fn interval_ns(value: &ScalarValue) -> Option<i64> {
    const DAY_NS: i64 = 86_400_000_000_000;
    match value {
        ScalarValue::IntervalMonthDayNano(Some(v)) if v.months == 0 => i64::from(v.days)
            .checked_mul(DAY_NS)?
            .checked_add(v.nanoseconds),
        ScalarValue::IntervalDayTime(Some(v)) => i64::from(v.days)
            .checked_mul(DAY_NS)?
            .checked_add(i64::from(v.milliseconds).checked_mul(1_000_000)?),
        _ => None,
    }
}

/// The relation `TUMBLE(...)`/`HOP(...)` return.
#[derive(Debug)]
pub struct WindowTable {
    pub shape: WindowShape,
    /// The relation windowed (a source, table or view), by name.
    pub input_name: String,
    pub input: Arc<dyn TableProvider>,
    /// Index of the event-time column in the input.
    pub time_column: usize,
    schema: SchemaRef,
}

impl WindowTable {
    /// Input columns + `window_start`, `window_end`.
    pub fn output_schema(input: &Schema) -> SchemaRef {
        let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
        let ts = DataType::Timestamp(TimeUnit::Nanosecond, None);
        fields.push(Field::new("window_start", ts.clone(), false));
        fields.push(Field::new("window_end", ts, false));
        Arc::new(Schema::new(fields))
    }
}

#[async_trait]
impl TableProvider for WindowTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        // Batch windows over the input's current rows (materialised: window queries in batch
        // are for inspection and for checking views, not the hot path).
        let plan = self.input.scan(state, None, &[], None).await?;
        let batches = datafusion::physical_plan::collect(plan, state.task_ctx()).await?;
        let weir = |e: WeirError| DataFusionError::External(Box::new(e));
        let mut out = Vec::with_capacity(batches.len());
        match &self.shape {
            WindowShape::Fixed(kind) => {
                for batch in batches {
                    let (windowed, _) = kind
                        .assign(&batch, self.time_column, &self.schema)
                        .map_err(weir)?;
                    out.push(windowed);
                }
            }
            WindowShape::Session { gap_ns, keys } => {
                let all = arrow::compute::concat_batches(&self.input.schema(), &batches)?;
                out.push(
                    assign_sessions(&all, self.time_column, keys, *gap_ns, &self.schema)
                        .map_err(weir)?,
                );
            }
        }
        Ok(MemorySourceConfig::try_new_exec(
            &[out],
            self.schema.clone(),
            projection.cloned(),
        )?)
    }
}

/// `TUMBLE`, `HOP` or `SESSION`, registered with DataFusion as a table function.
pub struct WindowFunction {
    name: &'static str,
    lookup: RelationLookup,
}

impl fmt::Debug for WindowFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WindowFunction({})", self.name)
    }
}

impl WindowFunction {
    /// The three window functions over relations found by `lookup`.
    pub fn all(lookup: RelationLookup) -> Vec<(&'static str, Arc<WindowFunction>)> {
        ["tumble", "hop", "session"]
            .into_iter()
            .map(|name| {
                (
                    name,
                    Arc::new(WindowFunction {
                        name,
                        lookup: lookup.clone(),
                    }),
                )
            })
            .collect()
    }

    fn usage(&self) -> &'static str {
        match self.name {
            "tumble" => "TUMBLE(relation, time_column, INTERVAL '1' MINUTE)",
            "hop" => {
                "HOP(relation, time_column, INTERVAL '10' SECOND (slide), INTERVAL '1' MINUTE (size))"
            }
            _ => "SESSION(relation, time_column, INTERVAL '30' SECOND (gap) [, key column, ...])",
        }
    }

    fn error(&self, message: String) -> DataFusionError {
        DataFusionError::External(Box::new(
            WeirError::new(SqlState::INVALID_PARAMETER_VALUE, message)
                .with_hint(format!("write {}", self.usage())),
        ))
    }

    fn name_arg(&self, expr: &Expr, what: &str) -> datafusion::error::Result<String> {
        match expr {
            Expr::Column(c) => Ok(c.name.clone()),
            Expr::Literal(ScalarValue::Utf8(Some(s)), _) => Ok(s.clone()),
            other => Err(self.error(format!(
                "{}: the {what} must be a name, not {other}",
                self.name.to_uppercase()
            ))),
        }
    }

    fn interval_arg(&self, expr: &Expr, what: &str) -> datafusion::error::Result<i64> {
        let ns = match expr {
            Expr::Literal(value, _) => interval_ns(value),
            _ => None,
        };
        match ns {
            Some(ns) if ns > 0 => Ok(ns),
            _ => Err(self.error(format!(
                "{}: the {what} must be a positive interval of days or less, such as INTERVAL '10' SECOND",
                self.name.to_uppercase()
            ))),
        }
    }
}

impl TableFunctionImpl for WindowFunction {
    fn call_with_args(
        &self,
        args: datafusion::catalog::TableFunctionArgs,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let exprs = args.exprs();
        let wanted = if self.name == "hop" { 4 } else { 3 };
        let fits = exprs.len() == wanted || (self.name == "session" && exprs.len() > wanted);
        if !fits {
            return Err(self.error(format!(
                "{} takes {wanted} arguments, not {}",
                self.name.to_uppercase(),
                exprs.len()
            )));
        }
        let input_name = self.name_arg(&exprs[0], "first argument (the relation)")?;
        let time_name = self.name_arg(&exprs[1], "second argument (the time column)")?;
        let input = (self.lookup)(&input_name).ok_or_else(|| {
            DataFusionError::External(Box::new(
                WeirError::new(
                    SqlState::UNDEFINED_TABLE,
                    format!("relation \"{input_name}\" does not exist"),
                )
                .with_hint("window functions read a source, table or materialized view by name"),
            ))
        })?;
        let input_schema = input.schema();
        let column = |name: &str| {
            input_schema.index_of(name).map_err(|_| {
                DataFusionError::External(Box::new(WeirError::new(
                    SqlState::UNDEFINED_COLUMN,
                    format!("column \"{name}\" of relation \"{input_name}\" does not exist"),
                )))
            })
        };
        let shape = match self.name {
            "tumble" => WindowShape::Fixed(WindowKind::Tumble {
                size_ns: self.interval_arg(&exprs[2], "size")?,
            }),
            "hop" => {
                let slide_ns = self.interval_arg(&exprs[2], "slide")?;
                let size_ns = self.interval_arg(&exprs[3], "size")?;
                if size_ns % slide_ns != 0 {
                    return Err(self
                        .error("HOP: the size must be a whole multiple of the slide".to_string()));
                }
                WindowShape::Fixed(WindowKind::Hop { slide_ns, size_ns })
            }
            _ => {
                let gap_ns = self.interval_arg(&exprs[2], "gap")?;
                let keys = exprs[3..]
                    .iter()
                    .map(|e| self.name_arg(e, "key column").and_then(|n| column(&n)))
                    .collect::<datafusion::error::Result<Vec<_>>>()?;
                WindowShape::Session { gap_ns, keys }
            }
        };
        let time_column = column(&time_name)?;
        if input_schema.field(time_column).data_type()
            != &DataType::Timestamp(TimeUnit::Nanosecond, None)
        {
            return Err(DataFusionError::External(Box::new(
                WeirError::new(
                    SqlState::DATATYPE_MISMATCH,
                    format!(
                        "window time column \"{time_name}\" has type {}, not TIMESTAMP",
                        input_schema.field(time_column).data_type()
                    ),
                )
                .with_hint("window by a TIMESTAMP column"),
            )));
        }
        let schema = WindowTable::output_schema(&input_schema);
        Ok(Arc::new(WindowTable {
            shape,
            input_name,
            input,
            time_column,
            schema,
        }))
    }
}
