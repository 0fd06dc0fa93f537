//! PostgreSQL `COPY ... FROM STDIN` payloads (text and CSV) → one `RecordBatch`.
//!
//! CSV goes through arrow-csv. The text format (tab separated, `\N` for NULL,
//! backslash escapes) is split here, then each column is cast from text with
//! Arrow's cast kernels, so both formats parse values the same way. Errors name
//! the 1-based line of the input, as PostgreSQL's do; nothing is partially
//! loaded (the caller inserts the whole batch or nothing).

use std::io::Cursor;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow::compute::{CastOptions, cast_with_options, concat_batches};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::util::display::FormatOptions;

use crate::types::{SqlState, WeirError};

/// How the client encodes rows, from `COPY ... WITH (FORMAT ..., ...)`.
#[derive(Debug, Clone, PartialEq)]
pub enum CopyFormat {
    Text {
        delimiter: u8,
        null: String,
    },
    Csv {
        delimiter: u8,
        quote: u8,
        header: bool,
    },
}

impl CopyFormat {
    pub fn text() -> Self {
        CopyFormat::Text {
            delimiter: b'\t',
            null: "\\N".to_string(),
        }
    }

    pub fn csv() -> Self {
        CopyFormat::Csv {
            delimiter: b',',
            quote: b'"',
            header: false,
        }
    }
}

/// Decodes a complete COPY payload into rows of `schema`.
pub fn decode_copy(
    data: &[u8],
    format: &CopyFormat,
    schema: SchemaRef,
) -> Result<RecordBatch, WeirError> {
    match format {
        CopyFormat::Text { delimiter, null } => decode_text(data, *delimiter, null, schema),
        CopyFormat::Csv {
            delimiter,
            quote,
            header,
        } => decode_csv(data, *delimiter, *quote, *header, schema),
    }
}

fn decode_csv(
    data: &[u8],
    delimiter: u8,
    quote: u8,
    header: bool,
    schema: SchemaRef,
) -> Result<RecordBatch, WeirError> {
    let reader = arrow::csv::ReaderBuilder::new(schema.clone())
        .with_header(header)
        .with_delimiter(delimiter)
        .with_quote(quote)
        .with_batch_size(8192)
        .build(Cursor::new(data))
        .map_err(|e| copy_error(e, header))?;
    let mut batches = Vec::new();
    for batch in reader {
        batches.push(batch.map_err(|e| copy_error(e, header))?);
    }
    concat_batches(&schema, &batches).map_err(|e| copy_error(e, header))
}

/// arrow-csv names the data row ("... at line 3"); PostgreSQL names the line
/// of the input, which is one more when a header line precedes the data.
fn copy_error(e: arrow::error::ArrowError, header: bool) -> WeirError {
    let text = e.to_string();
    let text = text
        .strip_prefix("Parser error: ")
        .or_else(|| text.strip_prefix("Csv error: "))
        .unwrap_or(&text)
        .to_string();
    let text = match text.split_once("at line ") {
        Some((before, after)) if header => {
            let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
            match digits.parse::<usize>() {
                Ok(line) => format!("{before}at line {}{}", line + 1, &after[digits.len()..]),
                Err(_) => text,
            }
        }
        _ => text,
    };
    WeirError::new(
        SqlState::INVALID_TEXT_REPRESENTATION,
        format!("invalid COPY data: {text}"),
    )
    .with_hint("fix the line named above and run COPY again; no rows were loaded")
}

fn decode_text(
    data: &[u8],
    delimiter: u8,
    null: &str,
    schema: SchemaRef,
) -> Result<RecordBatch, WeirError> {
    let text = std::str::from_utf8(data).map_err(|e| {
        WeirError::new(
            SqlState::BAD_COPY_FILE_FORMAT,
            format!("COPY data is not valid UTF-8: {e}"),
        )
    })?;
    let ncols = schema.fields().len();
    let mut columns: Vec<Vec<Option<String>>> = vec![Vec::new(); ncols];
    let mut line_numbers = Vec::new();
    for (idx, line) in text.split('\n').enumerate() {
        let line_no = idx + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line == "\\." {
            break;
        }
        if line.is_empty() && idx + 1 == text.split('\n').count() {
            break; // the newline that ends the last row
        }
        let fields = split_text_line(line, delimiter as char, null, line_no)?;
        if fields.len() != ncols {
            let msg = if fields.len() < ncols {
                format!(
                    "missing data for column \"{}\" at line {line_no}",
                    schema.field(fields.len()).name()
                )
            } else {
                format!("extra data after last expected column at line {line_no}")
            };
            return Err(WeirError::new(SqlState::BAD_COPY_FILE_FORMAT, msg)
                .with_hint("fix the line named above and run COPY again; no rows were loaded"));
        }
        for (col, field) in columns.iter_mut().zip(fields) {
            col.push(field);
        }
        line_numbers.push(line_no);
    }
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(ncols);
    for (field, values) in schema.fields().iter().zip(columns) {
        let strings: ArrayRef = Arc::new(StringArray::from(values));
        arrays.push(cast_column(
            &strings,
            field.data_type(),
            field.name(),
            &line_numbers,
        )?);
    }
    RecordBatch::try_new(schema, arrays).map_err(|e| {
        WeirError::new(
            SqlState::NOT_NULL_VIOLATION,
            format!("invalid COPY data: {e}"),
        )
    })
}

/// Casts text to `to`; on failure finds the first row that did not convert and
/// names its line.
fn cast_column(
    strings: &ArrayRef,
    to: &DataType,
    column: &str,
    line_numbers: &[usize],
) -> Result<ArrayRef, WeirError> {
    let strict = CastOptions {
        safe: false,
        format_options: FormatOptions::default(),
    };
    match cast_with_options(strings, to, &strict) {
        Ok(array) => Ok(array),
        Err(err) => {
            let lenient = CastOptions {
                safe: true,
                format_options: FormatOptions::default(),
            };
            let converted = cast_with_options(strings, to, &lenient).ok();
            let bad_row = converted
                .and_then(|c| (0..strings.len()).find(|&i| !strings.is_null(i) && c.is_null(i)));
            let (line, value) = match bad_row {
                Some(row) => (
                    line_numbers.get(row).copied().unwrap_or(row + 1),
                    strings
                        .as_any()
                        .downcast_ref::<StringArray>()
                        .map(|s| s.value(row).to_string())
                        .unwrap_or_default(),
                ),
                None => (0, String::new()),
            };
            Err(WeirError::new(
                SqlState::INVALID_TEXT_REPRESENTATION,
                format!(
                    "invalid input syntax for type {to} in column \"{column}\" at line {line}: \"{value}\""
                ),
            )
            .with_detail(err.to_string())
            .with_hint("fix the line named above and run COPY again; no rows were loaded"))
        }
    }
}

/// Splits one line of PostgreSQL's text format into fields, undoing escapes.
fn split_text_line(
    line: &str,
    delimiter: char,
    null: &str,
    line_no: usize,
) -> Result<Vec<Option<String>>, WeirError> {
    let mut fields = Vec::new();
    for raw in line.split(delimiter) {
        if raw == null {
            fields.push(None);
            continue;
        }
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('t') => out.push('\t'),
                Some('n') => out.push('\n'),
                Some('r') => out.push('\r'),
                Some('b') => out.push('\u{8}'),
                Some('f') => out.push('\u{c}'),
                Some('v') => out.push('\u{b}'),
                Some(d @ '0'..='7') => {
                    let mut value = d.to_digit(8).unwrap_or(0);
                    for _ in 0..2 {
                        match chars.peek().and_then(|c| c.to_digit(8)) {
                            Some(v) => {
                                value = value * 8 + v;
                                chars.next();
                            }
                            None => break,
                        }
                    }
                    out.push(char::from_u32(value).unwrap_or('\u{fffd}'));
                }
                Some(other) => out.push(other),
                None => {
                    return Err(WeirError::new(
                        SqlState::BAD_COPY_FILE_FORMAT,
                        format!("unterminated backslash escape at line {line_no}"),
                    ));
                }
            }
        }
        fields.push(Some(out));
    }
    Ok(fields)
}
