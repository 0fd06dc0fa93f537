//! Result column names as PostgreSQL chooses them for unaliased expressions
//! (`select count(*)` → `count`, `select 1` → `?column?`), where DataFusion
//! would print the expression (`count(*)`, `Int64(1)`). Clients and tests
//! read these names, so they follow PostgreSQL's `FigureColname` rules.

use datafusion::sql::sqlparser::ast::{Expr, Query, SelectItem, SetExpr, Statement};

/// PostgreSQL's names for the columns of `statement`, one per column, or
/// `None` when they cannot be matched to columns (e.g. `SELECT *`).
pub fn pg_column_names(statement: &Statement, columns: usize) -> Option<Vec<Option<String>>> {
    let Statement::Query(query) = statement else {
        return None;
    };
    let items = leftmost_select_items(query)?;
    if items.len() != columns {
        return None;
    }
    let mut names = Vec::with_capacity(items.len());
    for item in items {
        match item {
            SelectItem::UnnamedExpr(expr) => names.push(Some(figure_name(expr))),
            SelectItem::ExprWithAlias { .. } => names.push(None),
            _ => return None, // wildcards expand to an unknown number of columns
        }
    }
    Some(names)
}

fn leftmost_select_items(query: &Query) -> Option<&Vec<SelectItem>> {
    let mut body = query.body.as_ref();
    loop {
        match body {
            SetExpr::Select(select) => return Some(&select.projection),
            SetExpr::SetOperation { left, .. } => body = left.as_ref(),
            SetExpr::Query(inner) => body = inner.body.as_ref(),
            _ => return None,
        }
    }
}

fn figure_name(expr: &Expr) -> String {
    match expr {
        Expr::Identifier(ident) => ident.value.clone(),
        Expr::CompoundIdentifier(parts) => parts
            .last()
            .map(|p| p.value.clone())
            .unwrap_or_else(|| "?column?".to_string()),
        Expr::Function(function) => function
            .name
            .0
            .last()
            .and_then(|p| p.as_ident())
            .map(|i| i.value.to_lowercase())
            .unwrap_or_else(|| "?column?".to_string()),
        Expr::Nested(inner) => figure_name(inner),
        Expr::Cast {
            expr: inner,
            data_type,
            ..
        } => match figure_name(inner).as_str() {
            "?column?" => data_type.to_string().to_lowercase(),
            name => name.to_string(),
        },
        Expr::Case { .. } => "case".to_string(),
        Expr::Exists { .. } => "exists".to_string(),
        Expr::Array(_) => "array".to_string(),
        Expr::Extract { .. } => "extract".to_string(),
        Expr::Substring { .. } => "substring".to_string(),
        Expr::Trim { .. } => "btrim".to_string(),
        Expr::Position { .. } => "position".to_string(),
        Expr::Ceil { .. } => "ceil".to_string(),
        Expr::Floor { .. } => "floor".to_string(),
        _ => "?column?".to_string(),
    }
}
