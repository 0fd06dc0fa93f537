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
    FilterOperator, ProjectOperator, SessionOperator, UnionOperator, WindowAggregateOperator,
    WindowKey, WindowOperator,
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

/// The pieces of `Aggregate(HOP(...))` that pane-based aggregation needs.
struct HopShape {
    /// The `WindowTable` (a HOP) the aggregate reads.
    provider: Arc<dyn datafusion::catalog::TableProvider>,
    slide_ns: i64,
    size_ns: i64,
    /// For each group expression: its column in the window table's schema.
    groups: Vec<usize>,
    /// For each aggregate: function name, its UDF, and the argument's column (None: `count(*)`).
    aggs: Vec<(
        String,
        Arc<datafusion::logical_expr::AggregateUDF>,
        Option<usize>,
    )>,
}

/// The column of the window table a plain column of `plan`'s output comes from, through
/// column-only projections and aliases, with the `WindowTable` at the bottom.
fn window_column(
    plan: &LogicalPlan,
    index: usize,
) -> Option<(Arc<dyn datafusion::catalog::TableProvider>, usize)> {
    match plan {
        LogicalPlan::Projection(p) => match p.expr.get(index)?.clone().unalias() {
            Expr::Column(c) => window_column(&p.input, p.input.schema().index_of_column(&c).ok()?),
            _ => None,
        },
        LogicalPlan::SubqueryAlias(s) => window_column(&s.input, index),
        LogicalPlan::TableScan(scan) if scan.filters.is_empty() => {
            let provider = source_as_provider(&scan.source).ok()?;
            provider.downcast_ref::<WindowTable>()?;
            let column = match &scan.projection {
                Some(p) => *p.get(index)?,
                None => index,
            };
            Some((provider, column))
        }
        _ => None,
    }
}

impl Compiler<'_> {
    /// `GROUP BY` window + columns over `HOP(...)` with count/sum/min/max of columns, emitted on
    /// window close: instead of copying each row into its `size / slide` windows, aggregate
    /// rows per slide-long pane first (a TUMBLE of the slide), then combine the panes of each
    /// window (sum of counts and sums, min of mins, max of maxes). `None` when the query has
    /// another shape; the general path handles it.
    fn pane_hop(
        &mut self,
        a: &datafusion::logical_expr::Aggregate,
        closes: &mut bool,
    ) -> WeirResult<Option<Compiled>> {
        let Some(shape) = self.hop_shape(a) else {
            return Ok(None);
        };
        let window = shape
            .provider
            .downcast_ref::<WindowTable>()
            .ok_or_else(|| WeirError::internal("pane HOP without a window table"))?;
        let relation_schema = window.input.schema();
        let n_in = relation_schema.fields().len();
        let input_schema = Arc::new(
            DFSchema::try_from_qualified_schema(window.input_name.as_str(), &relation_schema)
                .map_err(|e| self.df(e))?,
        );
        let input = self.relation(&window.input_name, input_schema, true, closes)?;
        if !input.append_only {
            return Err(WeirError::internal("pane HOP over an updating input"));
        }
        let col = |name: &str, i: usize| -> Arc<dyn PhysicalExpr> {
            Arc::new(PhysicalColumn::new(name, i))
        };
        // 1. Panes: TUMBLE(slide) over the relation.
        let pane_schema = WindowTable::output_schema(&relation_schema);
        let panes = self.builder.operator(
            Box::new(WindowOperator::new(
                crate::stream::WindowKind::Tumble {
                    size_ns: shape.slide_ns,
                },
                window.time_column,
                pane_schema.clone(),
            )),
            vec![input.at],
        );
        // 2. Per pane and key: partial aggregates, emitted when the pane closes.
        let keys: Vec<usize> = shape.groups.iter().copied().filter(|&c| c < n_in).collect();
        let mut s1_groups = vec![col("window_start", n_in)];
        let mut s1_fields = vec![arrow::datatypes::Field::new(
            "__pane_start",
            pane_schema.field(n_in).data_type().clone(),
            true,
        )];
        for (k, &c) in keys.iter().enumerate() {
            s1_groups.push(col(relation_schema.field(c).name(), c));
            s1_fields.push(arrow::datatypes::Field::new(
                format!("__key{k}"),
                relation_schema.field(c).data_type().clone(),
                true,
            ));
        }
        let df = |e: datafusion::error::DataFusionError| from_datafusion(e, self.text);
        let mut s1_aggs = Vec::new();
        for (j, (_, udf, arg)) in shape.aggs.iter().enumerate() {
            let args: Vec<Arc<dyn PhysicalExpr>> = match arg {
                Some(c) => vec![col(relation_schema.field(*c).name(), *c)],
                None => vec![Arc::new(
                    datafusion::physical_expr::expressions::Literal::new(
                        datafusion::scalar::ScalarValue::Int64(Some(1)),
                    ),
                )],
            };
            let expr =
                datafusion::physical_expr::aggregate::AggregateExprBuilder::new(udf.clone(), args)
                    .schema(pane_schema.clone())
                    .alias(format!("{} per pane", shape.aggs[j].0))
                    .build()
                    .map_err(df)?;
            s1_fields.push(expr.field().as_ref().clone().with_nullable(true));
            s1_aggs.push((Arc::new(expr), None));
        }
        let s1_schema = Arc::new(arrow::datatypes::Schema::new(s1_fields));
        let s1_names = std::iter::once("pane_start".to_string())
            .chain(
                keys.iter()
                    .map(|&c| relation_schema.field(c).name().clone()),
            )
            .collect();
        let stage1 = self.aggregate(
            s1_groups,
            s1_names,
            s1_aggs,
            &pane_schema,
            s1_schema.clone(),
            AggregateMode::EmitOnWindowClose,
            Some(WindowKey {
                group_index: 0,
                end_offset_ns: shape.slide_ns,
            }),
            true,
        )?;
        let stage1 = self.builder.operator(stage1, vec![panes]);
        // 3. Each pane's row into the windows that contain it.
        let n1 = s1_schema.fields().len();
        let s2_input = WindowTable::output_schema(&s1_schema);
        let windows = self.builder.operator(
            Box::new(WindowOperator::new(
                crate::stream::WindowKind::Hop {
                    slide_ns: shape.slide_ns,
                    size_ns: shape.size_ns,
                },
                0,
                s2_input.clone(),
            )),
            vec![stage1],
        );
        // 4. Per window and key: combine the panes, emitted when the window closes.
        let mut s2_groups = Vec::new();
        let mut s2_names = Vec::new();
        let mut window_key = None;
        for (g, &c) in shape.groups.iter().enumerate() {
            let (name, index) = if c == n_in {
                window_key = Some(WindowKey {
                    group_index: g,
                    end_offset_ns: shape.size_ns,
                });
                ("window_start".to_string(), n1)
            } else if c == n_in + 1 {
                window_key = Some(WindowKey {
                    group_index: g,
                    end_offset_ns: 0,
                });
                ("window_end".to_string(), n1 + 1)
            } else {
                let k = keys.iter().position(|&x| x == c).unwrap_or(0);
                (format!("__key{k}"), 1 + k)
            };
            s2_groups.push(col(&name, index));
            s2_names.push(name);
        }
        let functions = self.state.aggregate_functions();
        let mut s2_aggs = Vec::new();
        for (j, (name, udf, _)) in shape.aggs.iter().enumerate() {
            let combine = match name.as_str() {
                "count" | "sum" => functions.get("sum"),
                _ => Some(udf),
            }
            .ok_or_else(|| WeirError::internal("sum is not registered"))?;
            let partial = 1 + keys.len() + j;
            let expr = datafusion::physical_expr::aggregate::AggregateExprBuilder::new(
                combine.clone(),
                vec![col(&format!("__partial{j}"), partial)],
            )
            .schema(s2_input.clone())
            .alias(format!("{name} over panes"))
            .build()
            .map_err(df)?;
            s2_aggs.push((Arc::new(expr), None));
        }
        let schema = Arc::new(a.schema.as_arrow().clone());
        let stage2 = self.aggregate(
            s2_groups,
            s2_names,
            s2_aggs,
            &s2_input,
            schema,
            AggregateMode::EmitOnWindowClose,
            window_key,
            true,
        )?;
        let at = self.builder.operator(stage2, vec![windows]);
        *closes = true;
        let mut windows_out = vec![None; a.schema.fields().len()];
        for (g, &c) in shape.groups.iter().enumerate() {
            if c == n_in {
                windows_out[g] = Some(shape.size_ns);
            } else if c == n_in + 1 {
                windows_out[g] = Some(0);
            }
        }
        Ok(Some(Compiled {
            at,
            schema: a.schema.clone(),
            append_only: true,
            windows: windows_out,
        }))
    }

    /// An aggregate operator: `WindowAggregateOperator` for EOWC windows over append-only input
    /// whose functions all have groups accumulators, `AggregateOperator` otherwise; with keys,
    /// `parallelism` instances behind a hash exchange on them.
    #[allow(clippy::too_many_arguments)]
    fn aggregate(
        &self,
        groups: Vec<Arc<dyn PhysicalExpr>>,
        names: Vec<String>,
        aggs: Vec<crate::stream::AggregateInput>,
        input_schema: &arrow::datatypes::Schema,
        schema: arrow::datatypes::SchemaRef,
        mode: AggregateMode,
        window: Option<WindowKey>,
        append_only: bool,
    ) -> WeirResult<Box<dyn crate::stream::Operator>> {
        // A global aggregate has one group.
        let instances = if groups.is_empty() {
            1
        } else {
            self.parallelism
        };
        let vectorized = mode == AggregateMode::EmitOnWindowClose
            && append_only
            && WindowAggregateOperator::supports(&aggs);
        let mut ops: Vec<Box<dyn crate::stream::Operator>> = Vec::with_capacity(instances);
        for _ in 0..instances {
            ops.push(match window {
                Some(w) if vectorized => Box::new(WindowAggregateOperator::try_new(
                    groups.clone(),
                    names.clone(),
                    aggs.clone(),
                    input_schema,
                    schema.clone(),
                    w,
                )?),
                _ => Box::new(AggregateOperator::try_new(
                    groups.clone(),
                    names.clone(),
                    aggs.clone(),
                    input_schema,
                    schema.clone(),
                    mode,
                    window,
                    append_only,
                )?),
            });
        }
        if ops.len() == 1 {
            return ops
                .pop()
                .ok_or_else(|| WeirError::internal("no aggregate instance"));
        }
        Ok(Box::new(ExchangeOperator::try_new(
            groups,
            input_schema,
            ops,
            "aggregate",
        )?))
    }

    fn hop_shape(&self, a: &datafusion::logical_expr::Aggregate) -> Option<HopShape> {
        let mut window: Option<Arc<dyn datafusion::catalog::TableProvider>> = None;
        let mut same_window = |w: Arc<dyn datafusion::catalog::TableProvider>| match &window {
            None => {
                window = Some(w);
                true
            }
            Some(x) => Arc::ptr_eq(x, &w),
        };
        let input_schema = a.input.schema();
        let mut groups = Vec::new();
        for e in &a.group_expr {
            let Expr::Column(c) = e else { return None };
            let (w, column) = window_column(&a.input, input_schema.index_of_column(c).ok()?)?;
            if !same_window(w) {
                return None;
            }
            groups.push(column);
        }
        let mut aggs = Vec::new();
        for e in &a.aggr_expr {
            let Expr::AggregateFunction(f) = e.clone().unalias() else {
                return None;
            };
            let name = f.func.name().to_ascii_lowercase();
            let p = &f.params;
            if !["count", "sum", "min", "max"].contains(&name.as_str())
                || p.distinct
                || p.filter.is_some()
                || !p.order_by.is_empty()
                || p.args.len() != 1
            {
                return None;
            }
            let arg = match &p.args[0] {
                Expr::Literal(v, _) if name == "count" && !v.is_null() => None,
                Expr::Column(c) => {
                    let (w, column) =
                        window_column(&a.input, input_schema.index_of_column(c).ok()?)?;
                    if !same_window(w) {
                        return None;
                    }
                    Some(column)
                }
                _ => return None,
            };
            aggs.push((name, f.func.clone(), arg));
        }
        let provider = window?;
        let table = provider.downcast_ref::<WindowTable>()?;
        let WindowShape::Fixed(crate::stream::WindowKind::Hop { slide_ns, size_ns }) = table.shape
        else {
            return None;
        };
        let n_in = table.input.schema().fields().len();
        // A window bound must be grouped by (to close windows), and arguments must be input
        // columns, not the window bounds.
        if !groups.iter().any(|&c| c >= n_in)
            || aggs
                .iter()
                .any(|(_, _, arg)| arg.is_some_and(|c| c >= n_in))
        {
            return None;
        }
        Some(HopShape {
            provider,
            slide_ns,
            size_ns,
            groups,
            aggs,
        })
    }

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
                            let input_schema = window.input.schema();
                            let session = || {
                                SessionOperator::try_new(
                                    window.time_column,
                                    keys.clone(),
                                    *gap_ns,
                                    input_schema.clone(),
                                    schema.clone(),
                                    eowc,
                                )
                            };
                            if keys.is_empty() || self.parallelism == 1 {
                                Box::new(session()?)
                            } else {
                                // Sessions per key: N instances behind a hash of the keys.
                                let key_exprs: Vec<Arc<dyn PhysicalExpr>> = keys
                                    .iter()
                                    .map(|&k| {
                                        Arc::new(PhysicalColumn::new(
                                            input_schema.field(k).name(),
                                            k,
                                        ))
                                            as Arc<dyn PhysicalExpr>
                                    })
                                    .collect();
                                let mut instances: Vec<Box<dyn crate::stream::Operator>> =
                                    Vec::new();
                                for _ in 0..self.parallelism {
                                    instances.push(Box::new(session()?));
                                }
                                Box::new(ExchangeOperator::try_new(
                                    key_exprs,
                                    &input_schema,
                                    instances,
                                    "session",
                                )?)
                            }
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
                if eowc && let Some(compiled) = self.pane_hop(a, closes)? {
                    return Ok(compiled);
                }
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
                let op = self.aggregate(
                    group_exprs,
                    group_names,
                    aggs,
                    &input_arrow,
                    schema,
                    mode,
                    window,
                    input.append_only,
                )?;
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
