//! `CREATE MATERIALIZED VIEW`'s query → a [`Dataflow`]: DataFusion plans and optimises the
//! query into a `LogicalPlan`; [`compile`] walks it bottom-up and builds one streaming operator
//! per node, with DataFusion's `PhysicalExpr`s and accumulators inside them.
//!
//! Along the way it tracks, per stream, whether it is append-only (sources) or updating
//! (tables, updating aggregates) — which picks the aggregates' accumulator strategy — and which
//! columns are window bounds (so an aggregate grouped by a window closes it on the watermark,
//! also in a view over a windowed view). Views read by a view are compiled inline from their
//! own plans, with their own emit mode. Nodes with no streaming form yet are refused with
//! 0A000 and a hint.

use std::sync::Arc;

use datafusion::catalog::default_table_source::source_as_provider;
use datafusion::common::{DFSchema, DFSchemaRef};
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::Column as PhysicalColumn;
// Deprecated for LoweredAggregateBuilder, which is not public API yet in 55.
#[allow(deprecated)]
use datafusion::physical_planner::create_aggregate_expr_and_maybe_filter;

use super::from_datafusion;
use super::window::{WindowShape, WindowTable};
use crate::stream::{
    AggregateMode, AggregateOperator, Dataflow, DataflowBuilder, Endpoint, ExchangeOperator,
    FilterOperator, ProjectOperator, SessionOperator, UnionOperator, WindowKey, WindowOperator,
};
use crate::types::{SqlState, WeirError, WeirResult};

/// How a relation named in a view's query is streamed.
pub enum Resolved {
    /// An input added to the builder (a source or a table).
    Input { at: Endpoint, append_only: bool },
    /// Another materialized view: compiled inline from its plan.
    View {
        plan: LogicalPlan,
        emit_on_window_close: bool,
    },
}

/// What the compiler needs of the engine: inputs for the relations a view reads.
pub trait StreamCatalog {
    /// Adds relation `name` as an input of `builder` (dropping late rows when `drop_late`:
    /// the input feeds a window), or returns the view's plan. 42P01 for an unknown name.
    fn resolve(
        &self,
        name: &str,
        builder: &mut DataflowBuilder,
        drop_late: bool,
    ) -> WeirResult<Resolved>;
}

/// One compiled stream: where it comes out, its columns, and what the compiler knows of it.
struct Compiled {
    at: Endpoint,
    schema: DFSchemaRef,
    append_only: bool,
    /// Per column: `Some(offset)` when the column is a window bound and `value + offset` is the
    /// window's end.
    windows: Vec<Option<i64>>,
}

/// Compiles an optimised `plan` into a dataflow. `emit_on_window_close` applies to this
/// view's windowed aggregates.
/// Keyed aggregates run `parallelism` ways behind a hash exchange on their group key.
pub fn compile(
    plan: &LogicalPlan,
    emit_on_window_close: bool,
    catalog: &dyn StreamCatalog,
    state: &SessionState,
    text: &str,
    parallelism: usize,
) -> WeirResult<Dataflow> {
    let mut compiler = Compiler {
        builder: DataflowBuilder::new(),
        catalog,
        state,
        text,
        parallelism: parallelism.max(1),
    };
    let mut closes_windows = false;
    let root = compiler.node(plan, emit_on_window_close, &mut closes_windows)?;
    if emit_on_window_close && !closes_windows {
        return Err(WeirError::unsupported(
            "EMIT ON WINDOW CLOSE needs an aggregate grouped by a window",
            "GROUP BY window_start or window_end of TUMBLE(...) or HOP(...) over a source with a WATERMARK, or drop EMIT ON WINDOW CLOSE",
        ));
    }
    Ok(compiler.builder.build(root.at))
}

struct Compiler<'a> {
    builder: DataflowBuilder,
    catalog: &'a dyn StreamCatalog,
    state: &'a SessionState,
    text: &'a str,
    parallelism: usize,
}

fn not_streamable(what: &str, hint: &str) -> WeirError {
    WeirError::new(
        SqlState::FEATURE_NOT_SUPPORTED,
        format!("{what} is not supported in a materialized view yet"),
    )
    .with_hint(hint.to_string())
}

impl Compiler<'_> {
    fn df(&self, e: datafusion::error::DataFusionError) -> WeirError {
        from_datafusion(e, self.text)
    }

    fn physical(&self, expr: &Expr, schema: &DFSchema) -> WeirResult<Arc<dyn PhysicalExpr>> {
        self.state
            .create_physical_expr(expr.clone(), schema)
            .map_err(|e| self.df(e))
    }

    /// A relation by name, as a stream with `schema`'s columns.
    fn relation(
        &mut self,
        name: &str,
        schema: DFSchemaRef,
        drop_late: bool,
        closes: &mut bool,
    ) -> WeirResult<Compiled> {
        match self.catalog.resolve(name, &mut self.builder, drop_late)? {
            Resolved::Input { at, append_only } => Ok(Compiled {
                at,
                windows: vec![None; schema.fields().len()],
                schema,
                append_only,
            }),
            Resolved::View {
                plan,
                emit_on_window_close,
            } => {
                let mut inner_closes = false;
                let compiled = self.node(&plan, emit_on_window_close, &mut inner_closes)?;
                let _ = closes;
                Ok(Compiled { schema, ..compiled })
            }
        }
    }

    fn node(&mut self, plan: &LogicalPlan, eowc: bool, closes: &mut bool) -> WeirResult<Compiled> {
        match plan {
            LogicalPlan::TableScan(scan) => {
                let provider = source_as_provider(&scan.source).map_err(|e| self.df(e))?;
                let name = scan.table_name.table().to_string();
                let full = if let Some(window) = provider.downcast_ref::<WindowTable>() {
                    let input_schema = Arc::new(
                        DFSchema::try_from_qualified_schema(
                            window.input_name.as_str(),
                            &window.input.schema(),
                        )
                        .map_err(|e| self.df(e))?,
                    );
                    let input = self.relation(&window.input_name, input_schema, true, closes)?;
                    let schema = provider.schema();
                    let mut windows = input.windows.clone();
                    let mut append_only = input.append_only;
                    let op: Box<dyn crate::stream::Operator> = match &window.shape {
                        WindowShape::Fixed(kind) => {
                            windows.push(Some(kind.size_ns()));
                            windows.push(Some(0));
                            Box::new(WindowOperator::new(
                                *kind,
                                window.time_column,
                                schema.clone(),
                            ))
                        }
                        WindowShape::Session { gap_ns, keys } => {
                            if !input.append_only {
                                return Err(not_streamable(
                                    "SESSION over a table or an updating view",
                                    "use SESSION over a source",
                                ));
                            }
                            // A session's start moves as it grows; its end closes it.
                            windows.push(None);
                            windows.push(Some(0));
                            append_only = eowc;
                            Box::new(SessionOperator::try_new(
                                window.time_column,
                                keys.clone(),
                                *gap_ns,
                                window.input.schema(),
                                schema.clone(),
                                eowc,
                            )?)
                        }
                    };
                    let at = self.builder.operator(op, vec![input.at]);
                    Compiled {
                        at,
                        schema: Arc::new(
                            DFSchema::try_from_qualified_schema(name.as_str(), &schema)
                                .map_err(|e| self.df(e))?,
                        ),
                        append_only,
                        windows,
                    }
                } else {
                    let schema = Arc::new(
                        DFSchema::try_from_qualified_schema(name.as_str(), &provider.schema())
                            .map_err(|e| self.df(e))?,
                    );
                    self.relation(&name, schema, false, closes)?
                };
                if !scan.filters.is_empty() {
                    return Err(WeirError::internal("filters pushed into a streaming scan"));
                }
                let Some(projection) = &scan.projection else {
                    return Ok(Compiled {
                        schema: scan.projected_schema.clone(),
                        ..full
                    });
                };
                let exprs: Vec<Arc<dyn PhysicalExpr>> = projection
                    .iter()
                    .map(|&i| {
                        Arc::new(PhysicalColumn::new(full.schema.field(i).name(), i))
                            as Arc<dyn PhysicalExpr>
                    })
                    .collect();
                let windows = projection.iter().map(|&i| full.windows[i]).collect();
                let at = self.builder.operator(
                    Box::new(ProjectOperator::new(
                        exprs,
                        Arc::new(scan.projected_schema.as_arrow().clone()),
                    )),
                    vec![full.at],
                );
                Ok(Compiled {
                    at,
                    schema: scan.projected_schema.clone(),
                    append_only: full.append_only,
                    windows,
                })
            }
            LogicalPlan::Projection(p) => {
                let input = self.node(&p.input, eowc, closes)?;
                let exprs = p
                    .expr
                    .iter()
                    .map(|e| self.physical(e, p.input.schema()))
                    .collect::<WeirResult<Vec<_>>>()?;
                let windows = p
                    .expr
                    .iter()
                    .map(|e| match e.clone().unalias() {
                        Expr::Column(c) => p
                            .input
                            .schema()
                            .index_of_column(&c)
                            .ok()
                            .and_then(|i| input.windows[i]),
                        _ => None,
                    })
                    .collect();
                let at = self.builder.operator(
                    Box::new(ProjectOperator::new(
                        exprs,
                        Arc::new(p.schema.as_arrow().clone()),
                    )),
                    vec![input.at],
                );
                Ok(Compiled {
                    at,
                    schema: p.schema.clone(),
                    append_only: input.append_only,
                    windows,
                })
            }
            LogicalPlan::Filter(f) => {
                let input = self.node(&f.input, eowc, closes)?;
                let predicate = self.physical(&f.predicate, f.input.schema())?;
                let at = self
                    .builder
                    .operator(Box::new(FilterOperator::new(predicate)), vec![input.at]);
                Ok(Compiled { at, ..input })
            }
            LogicalPlan::Aggregate(a) => {
                let input = self.node(&a.input, eowc, closes)?;
                if a.group_expr
                    .iter()
                    .any(|e| matches!(e, Expr::GroupingSet(_)))
                {
                    return Err(not_streamable(
                        "GROUPING SETS, ROLLUP and CUBE",
                        "create one materialized view per grouping",
                    ));
                }
                let input_arrow = a.input.schema().as_arrow().clone();
                let group_exprs = a
                    .group_expr
                    .iter()
                    .map(|e| self.physical(e, a.input.schema()))
                    .collect::<WeirResult<Vec<_>>>()?;
                let group_names: Vec<String> = a
                    .group_expr
                    .iter()
                    .map(|e| e.schema_name().to_string())
                    .collect();
                let mut aggs = Vec::with_capacity(a.aggr_expr.len());
                for e in &a.aggr_expr {
                    #[allow(deprecated)]
                    let (expr, filter, order_by) = create_aggregate_expr_and_maybe_filter(
                        e,
                        a.input.schema(),
                        &input_arrow,
                        self.state.execution_props(),
                    )
                    .map_err(|e| self.df(e))?;
                    if !order_by.is_empty() {
                        return Err(not_streamable(
                            "an aggregate with ORDER BY",
                            "drop the ORDER BY inside the aggregate",
                        ));
                    }
                    aggs.push((expr, filter));
                }
                // The window this aggregate closes: a group column that is a window bound.
                let window = a.group_expr.iter().enumerate().find_map(|(g, e)| match e {
                    Expr::Column(c) => a
                        .input
                        .schema()
                        .index_of_column(c)
                        .ok()
                        .and_then(|i| input.windows[i])
                        .map(|end_offset_ns| WindowKey {
                            group_index: g,
                            end_offset_ns,
                        }),
                    _ => None,
                });
                let mode = if eowc && window.is_some() {
                    *closes = true;
                    AggregateMode::EmitOnWindowClose
                } else {
                    AggregateMode::Updating
                };
                let schema = Arc::new(a.schema.as_arrow().clone());
                let instances = if group_exprs.is_empty() {
                    1 // a global aggregate has one group
                } else {
                    self.parallelism
                };
                let mut ops: Vec<Box<dyn crate::stream::Operator>> = Vec::with_capacity(instances);
                for _ in 0..instances {
                    ops.push(Box::new(AggregateOperator::try_new(
                        group_exprs.clone(),
                        group_names.clone(),
                        aggs.clone(),
                        &input_arrow,
                        schema.clone(),
                        mode,
                        window,
                        input.append_only,
                    )?));
                }
                let op: Box<dyn crate::stream::Operator> = if instances == 1 {
                    ops.pop()
                        .ok_or_else(|| WeirError::internal("no aggregate instance"))?
                } else {
                    Box::new(ExchangeOperator::try_new(
                        group_exprs.clone(),
                        &input_arrow,
                        ops,
                        "aggregate",
                    )?)
                };
                let at = self.builder.operator(op, vec![input.at]);
                let mut windows = vec![None; a.schema.fields().len()];
                for (g, e) in a.group_expr.iter().enumerate() {
                    if let Expr::Column(c) = e
                        && let Ok(i) = a.input.schema().index_of_column(c)
                    {
                        windows[g] = input.windows[i];
                    }
                }
                Ok(Compiled {
                    at,
                    schema: a.schema.clone(),
                    append_only: mode == AggregateMode::EmitOnWindowClose,
                    windows,
                })
            }
            LogicalPlan::Union(u) => {
                let mut inputs = Vec::with_capacity(u.inputs.len());
                for i in &u.inputs {
                    inputs.push(self.node(i, eowc, closes)?);
                }
                let n = u.schema.fields().len();
                let windows = (0..n)
                    .map(|c| {
                        let first = inputs.first().and_then(|i| i.windows[c]);
                        inputs
                            .iter()
                            .all(|i| i.windows[c] == first)
                            .then_some(first)
                            .flatten()
                    })
                    .collect();
                let append_only = inputs.iter().all(|i| i.append_only);
                let op = UnionOperator::new(Arc::new(u.schema.as_arrow().clone()), inputs.len());
                let at = self
                    .builder
                    .operator(Box::new(op), inputs.iter().map(|i| i.at).collect());
                Ok(Compiled {
                    at,
                    schema: u.schema.clone(),
                    append_only,
                    windows,
                })
            }
            LogicalPlan::SubqueryAlias(s) => {
                let input = self.node(&s.input, eowc, closes)?;
                Ok(Compiled {
                    schema: s.schema.clone(),
                    ..input
                })
            }
            LogicalPlan::Sort(s) if s.fetch.is_none() => {
                // A view is a set: its order is the SELECT's business.
                self.node(&s.input, eowc, closes)
            }
            LogicalPlan::Sort(_) | LogicalPlan::Limit(_) => Err(not_streamable(
                "LIMIT",
                "select with ORDER BY ... LIMIT from the view instead",
            )),
            LogicalPlan::Join(_) => Err(not_streamable(
                "JOIN",
                "joins in materialized views are coming; join views in a SELECT for now",
            )),
            LogicalPlan::Window(_) => Err(not_streamable(
                "a window function (OVER)",
                "use TUMBLE/HOP with GROUP BY, or run the OVER query as a SELECT on the view",
            )),
            LogicalPlan::Distinct(_) => Err(not_streamable(
                "DISTINCT ON",
                "use GROUP BY with the columns to keep",
            )),
            LogicalPlan::EmptyRelation(_) | LogicalPlan::Values(_) => Err(not_streamable(
                "a query without a FROM relation",
                "read a source, table or materialized view",
            )),
            other => Err(not_streamable(
                &format!("{} in a query", other.display()),
                "see docs/sql.md for what materialized views support",
            )),
        }
    }
}
