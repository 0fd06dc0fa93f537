//! PostgreSQL's text output for values whose Rust spelling differs from it.
//!
//! Floats: PostgreSQL (extra_float_digits = 1, the default) prints the
//! shortest text that reads back to the same value, switching to exponent
//! form below 1e-4 or from 1e15 (1e6 for `real`), and spells infinities
//! `Infinity`. Rust and ryu print `5.0` and `inf`. Clients compare text, so
//! the wire must match PostgreSQL.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float32Array, Float64Array, StringArray};
use arrow::datatypes::DataType;

/// PostgreSQL's text for a `double precision`.
pub fn float8_text(value: f64) -> String {
    float_text(value.is_nan(), value.is_infinite(), value.is_sign_negative(), &format!("{value:e}"), 15)
}

/// PostgreSQL's text for a `real`.
pub fn float4_text(value: f32) -> String {
    float_text(value.is_nan(), value.is_infinite(), value.is_sign_negative(), &format!("{value:e}"), 6)
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

/// Replaces a float column by its PostgreSQL text (other columns unchanged).
/// Only for columns sent in text format.
pub fn floats_as_pg_text(column: &ArrayRef) -> ArrayRef {
    match column.data_type() {
        DataType::Float64 => {
            let floats = column.as_any().downcast_ref::<Float64Array>();
            match floats {
                Some(f) => Arc::new(f.iter().map(|v| v.map(float8_text)).collect::<StringArray>()),
                None => column.clone(),
            }
        }
        DataType::Float32 => {
            let floats = column.as_any().downcast_ref::<Float32Array>();
            match floats {
                Some(f) => Arc::new(f.iter().map(|v| v.map(float4_text)).collect::<StringArray>()),
                None => column.clone(),
            }
        }
        _ => column.clone(),
    }
}
