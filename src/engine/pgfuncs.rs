//! PostgreSQL functions that psql's `\dt+`, `\d+` and `\l+` call and that
//! `datafusion-pg-catalog` does not provide: `pg_size_pretty`,
//! `pg_table_size`, `pg_database_size`, `pg_has_role`, and the comment
//! lookups `obj_description`, `shobj_description`, `col_description`
//! (Weir has no comments: NULL).
//!
//! Sizes Weir does not track per relation yet come back as NULL (psql then
//! shows an empty "Size"), never as a made-up number.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, Int64Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::error::Result;
use datafusion::logical_expr::{ColumnarValue, ScalarUDF, Volatility, create_udf};
use datafusion::prelude::SessionContext;

/// PostgreSQL's `pg_size_pretty(bigint)`: bytes below 10 kB, then kB, MB,
/// GB, TB, rounding halves up at each step.
pub fn size_pretty(bytes: i64) -> String {
    let units = ["kB", "MB", "GB", "TB", "PB"];
    if bytes.abs() < 10 * 1024 {
        return format!("{bytes} bytes");
    }
    let mut size = bytes;
    for unit in units {
        // Round half away from zero while dividing by 1024.
        let half = if size < 0 { -512 } else { 512 };
        let next = (size + half) / 1024;
        if next.abs() < 10 * 1024 || unit == "PB" {
            return format!("{next} {unit}");
        }
        size = next;
    }
    format!("{size} PB")
}

fn arrays(args: &[ColumnarValue]) -> Result<Vec<ArrayRef>> {
    ColumnarValue::values_to_arrays(args)
}

fn size_pretty_udf() -> ScalarUDF {
    create_udf(
        "pg_size_pretty",
        vec![DataType::Int64],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let input = cast(&arrays(args)?[0], &DataType::Int64)?;
            let input = input
                .as_any()
                .downcast_ref::<Int64Array>()
                .cloned()
                .unwrap_or_else(|| Int64Array::from(Vec::<Option<i64>>::new()));
            let out: StringArray = input.iter().map(|v| v.map(size_pretty)).collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    )
}

/// A size function Weir cannot answer yet: NULL for every row.
fn unknown_size_udf(name: &str, input: DataType) -> ScalarUDF {
    create_udf(
        name,
        vec![input],
        DataType::Int64,
        Volatility::Stable,
        Arc::new(|args: &[ColumnarValue]| {
            let rows = arrays(args)?.first().map(|a| a.len()).unwrap_or(1);
            Ok(ColumnarValue::Array(Arc::new(Int64Array::from(vec![
                None;
                rows
            ]))))
        }),
    )
}

/// A comment lookup: Weir stores no comments, so NULL text for every row.
fn no_comment_udf(name: &str, second: DataType) -> ScalarUDF {
    create_udf(
        name,
        vec![DataType::Int64, second],
        DataType::Utf8,
        Volatility::Stable,
        Arc::new(|args: &[ColumnarValue]| {
            let rows = arrays(args)?.first().map(|a| a.len()).unwrap_or(1);
            Ok(ColumnarValue::Array(Arc::new(StringArray::from(vec![
                None::<
                    &str,
                >;
                rows
            ]))))
        }),
    )
}

/// `pg_has_role(role, privilege)`: every session is the superuser.
fn has_role_udf() -> ScalarUDF {
    create_udf(
        "pg_has_role",
        vec![DataType::Utf8, DataType::Utf8],
        DataType::Boolean,
        Volatility::Stable,
        Arc::new(|args: &[ColumnarValue]| {
            let rows = arrays(args)?.first().map(|a| a.len()).unwrap_or(1);
            Ok(ColumnarValue::Array(Arc::new(BooleanArray::from(vec![
                true;
                rows
            ]))))
        }),
    )
}

/// Registers the functions in `ctx`.
pub fn register(ctx: &SessionContext) {
    ctx.register_udf(size_pretty_udf());
    ctx.register_udf(unknown_size_udf("pg_table_size", DataType::Int64));
    ctx.register_udf(unknown_size_udf("pg_database_size", DataType::Utf8));
    ctx.register_udf(has_role_udf());
    ctx.register_udf(no_comment_udf("obj_description", DataType::Utf8));
    ctx.register_udf(no_comment_udf("shobj_description", DataType::Utf8));
    ctx.register_udf(no_comment_udf("col_description", DataType::Int64));
}
