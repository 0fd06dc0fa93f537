//! PostgreSQL's text output for values whose Rust spelling differs from it.
//!
//! Floats: PostgreSQL (extra_float_digits = 1, the default) prints the
//! shortest text that reads back to the same value, switching to exponent
//! form below 1e-4 or from 1e15 (1e6 for `real`), and spells infinities
//! `Infinity`. Rust and ryu print `5.0` and `inf`. Timestamps: PostgreSQL
//! prints fractional seconds only when non-zero, without trailing zeros.
//! Clients compare text, so the wire must match PostgreSQL.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Float32Array, Float64Array, StringArray, TimestampMicrosecondArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, TimeUnit};

/// PostgreSQL's text for a `double precision`.
pub fn float8_text(value: f64) -> String {
    float_text(
        value.is_nan(),
        value.is_infinite(),
        value.is_sign_negative(),
        &format!("{value:e}"),
        15,
    )
}

/// PostgreSQL's text for a `real`.
pub fn float4_text(value: f32) -> String {
    float_text(
        value.is_nan(),
        value.is_infinite(),
        value.is_sign_negative(),
        &format!("{value:e}"),
        6,
    )
}

/// `scientific` is Rust's shortest round-trip `{:e}` form (`-1.25e-7`).
fn float_text(nan: bool, infinite: bool, negative: bool, scientific: &str, exp_max: i32) -> String {
    if nan {
        return "NaN".to_string();
    }
    if infinite {
        return if negative { "-Infinity" } else { "Infinity" }.to_string();
    }
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if digits.chars().all(|c| c == '0') {
        return format!("{sign}0");
    }
    if exponent < -4 || exponent >= exp_max {
        let esign = if exponent < 0 { '-' } else { '+' };
        return format!("{sign}{mantissa}e{esign}{:02}", exponent.abs());
    }
    let point = exponent + 1; // digits before the decimal point
    let text = if point <= 0 {
        format!("0.{}{}", "0".repeat((-point) as usize), digits)
    } else if point as usize >= digits.len() {
        format!("{}{}", digits, "0".repeat(point as usize - digits.len()))
    } else {
        let (int, frac) = digits.split_at(point as usize);
        format!("{int}.{frac}")
    };
    format!("{sign}{text}")
}

/// Whether values of this type need [`to_pg_text`] before a text-format
/// encoder sees them.
pub fn needs_pg_text(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Float32 | DataType::Float64 | DataType::Timestamp(_, _)
    )
}

/// PostgreSQL's text for a column whose type [`needs_pg_text`]; other
/// columns come back unchanged.
pub fn to_pg_text(column: &ArrayRef) -> ArrayRef {
    match column.data_type() {
        DataType::Float64 => match column.as_any().downcast_ref::<Float64Array>() {
            Some(f) => Arc::new(
                f.iter()
                    .map(|v| v.map(float8_text))
                    .collect::<StringArray>(),
            ),
            None => column.clone(),
        },
        DataType::Float32 => match column.as_any().downcast_ref::<Float32Array>() {
            Some(f) => Arc::new(
                f.iter()
                    .map(|v| v.map(float4_text))
                    .collect::<StringArray>(),
            ),
            None => column.clone(),
        },
        DataType::Timestamp(_, tz) => {
            let suffix = if tz.is_some() { "+00" } else { "" };
            let micros = cast(column, &DataType::Timestamp(TimeUnit::Microsecond, None))
                .ok()
                .and_then(|c| {
                    c.as_any()
                        .downcast_ref::<TimestampMicrosecondArray>()
                        .cloned()
                });
            match micros {
                Some(m) => Arc::new(
                    m.iter()
                        .map(|v| v.map(|us| timestamp_text(us, suffix)))
                        .collect::<StringArray>(),
                ),
                None => column.clone(),
            }
        }
        _ => column.clone(),
    }
}

/// `2026-01-01 10:00:01.5` from microseconds since the epoch (UTC).
pub fn timestamp_text(micros: i64, suffix: &str) -> String {
    let Some(at) = chrono::DateTime::from_timestamp_micros(micros) else {
        return micros.to_string();
    };
    let at = at.naive_utc();
    let mut text = at.format("%Y-%m-%d %H:%M:%S").to_string();
    let fraction = micros.rem_euclid(1_000_000);
    if fraction != 0 {
        let digits = format!("{fraction:06}");
        text.push('.');
        text.push_str(digits.trim_end_matches('0'));
    }
    text.push_str(suffix);
    text
}
