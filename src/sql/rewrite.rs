//! Rewrites of PostgreSQL constructs DataFusion does not plan, into
//! equivalents it does. Each rule says what it changes and where it differs.

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    Expr, Function, FunctionArg, FunctionArgExpr, FunctionArgumentList, FunctionArguments,
    GroupByExpr, Ident, ObjectName, SelectItem, SetExpr, Statement, VisitMut, VisitorMut,
};

/// Applies every rule to `statement`.
pub fn rewrite(mut statement: Statement) -> Statement {
    let _ = statement.visit(&mut ArraySubquery);
    statement
}

/// `ARRAY(SELECT x FROM ... WHERE ...)` → `(SELECT array_agg(x) FROM ... WHERE ...)`
/// for a plain one-column select (psql's `\du` sends one, correlated).
/// Difference: no matching rows gives NULL instead of an empty array.
struct ArraySubquery;

impl VisitorMut for ArraySubquery {
    type Break = ();

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        let Expr::Function(Function {
            name,
            args: FunctionArguments::Subquery(query),
            ..
        }) = expr
        else {
            return ControlFlow::Continue(());
        };
        if !name.to_string().eq_ignore_ascii_case("array") {
            return ControlFlow::Continue(());
        }
        let mut query = query.clone();
        let SetExpr::Select(select) = query.body.as_mut() else {
            return ControlFlow::Continue(());
        };
        let [SelectItem::UnnamedExpr(item) | SelectItem::ExprWithAlias { expr: item, .. }] =
            select.projection.as_slice()
        else {
            return ControlFlow::Continue(());
        };
        if query.order_by.is_some()
            || query.limit_clause.is_some()
            || !matches!(&select.group_by, GroupByExpr::Expressions(e, m) if e.is_empty() && m.is_empty())
        {
            return ControlFlow::Continue(());
        }
        let aggregate = Expr::Function(Function {
            name: ObjectName::from(vec![Ident::new("array_agg")]),
            uses_odbc_syntax: false,
            parameters: FunctionArguments::None,
            args: FunctionArguments::List(FunctionArgumentList {
                duplicate_treatment: None,
                args: vec![FunctionArg::Unnamed(FunctionArgExpr::Expr(item.clone()))],
                clauses: vec![],
            }),
            filter: None,
            null_treatment: None,
            over: None,
            within_group: vec![],
        });
        select.projection = vec![SelectItem::UnnamedExpr(aggregate)];
        *expr = Expr::Subquery(query);
        ControlFlow::Continue(())
    }
}
