//! `COPY table [(columns)] FROM STDIN [WITH (...)]`: the statement starts a
//! copy, the server streams the client's bytes into [`PendingCopy`], and
//! [`finish`] decodes them in one go and inserts them as one durable change
//! (all rows or none).

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, new_null_array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::sql::sqlparser::ast::{
    CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Statement,
};

use super::Weir;
use super::ddl::{lookup, normalise};
use super::table::{TableStore, nullable};
use crate::format::copy::{CopyFormat, decode_copy};
use crate::types::{SqlState, WeirError, WeirResult};

/// What a COPY loads into.
#[derive(Debug)]
enum Target {
    Table(Arc<TableStore>),
    /// A topic: each row is one message (`key`, `payload`, `headers`).
    Topic(String),
    /// A source: rows of its columns, encoded in its format, one message each.
    Source(Arc<super::stream::SourceHandle>),
}

/// The columns a COPY into a topic may name, in the order of `Target::Topic` rows.
const TOPIC_COLUMNS: [&str; 3] = ["key", "payload", "headers"];

/// A COPY waiting for its data.
#[derive(Debug)]
pub struct PendingCopy {
    target: Target,
    /// Indices (into the table's columns, or [`TOPIC_COLUMNS`]) of the
    /// columns the data carries.
    columns: Vec<usize>,
    pub format: CopyFormat,
    pub data: Vec<u8>,
    /// Set once data passed `copy_bytes_max`; the rest is discarded.
    pub overflowed: bool,
}

impl PendingCopy {
    pub fn num_columns(&self) -> usize {
        self.columns.len()
    }

    /// Appends a chunk of client data, enforcing the byte limit.
    pub fn push(&mut self, chunk: &[u8], limit_bytes: usize) {
        if self.overflowed || self.data.len() + chunk.len() > limit_bytes {
            self.overflowed = true;
            return;
        }
        self.data.extend_from_slice(chunk);
    }
}

/// Starts a COPY FROM STDIN.
pub(super) fn start(weir: &Weir, stmt: &Statement) -> WeirResult<PendingCopy> {
    let Statement::Copy {
        source,
        to,
        target,
        options,
        legacy_options,
        ..
    } = stmt
    else {
        return Err(WeirError::internal("not a COPY statement"));
    };
    if *to || !matches!(target, CopyTarget::Stdin) {
        return Err(WeirError::unsupported(
            "only COPY ... FROM STDIN is supported",
            "use COPY t FROM STDIN (psql: \\copy t from 'file'); query results with SELECT",
        ));
    }
    let CopySource::Table {
        table_name,
        columns,
    } = source
    else {
        return Err(WeirError::unsupported(
            "COPY (query) FROM is not supported",
            "name a table: COPY t FROM STDIN",
        ));
    };
    let topic_name = normalise(table_name);
    let (target, names): (Target, Vec<String>) = match lookup(weir, table_name) {
        Ok(table) => {
            let names = table
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect();
            (Target::Table(table), names)
        }
        Err(not_a_table) => match (weir.topic_exists(&topic_name), weir.source(&topic_name)) {
            (true, _) => (
                Target::Topic(topic_name.clone()),
                TOPIC_COLUMNS.iter().map(|c| c.to_string()).collect(),
            ),
            (false, Some(source)) => {
                let names = source
                    .schema
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect();
                (Target::Source(source), names)
            }
            (false, None) => return Err(not_a_table),
        },
    };
    let relation = table_name.to_string();
    let columns = if columns.is_empty() {
        match target {
            // One message per line: the payload.
            Target::Topic(_) => vec![1],
            Target::Table(_) | Target::Source(_) => (0..names.len()).collect(),
        }
    } else {
        columns
            .iter()
            .map(|c| {
                let name = normalise(&datafusion::sql::sqlparser::ast::ObjectName::from(vec![
                    c.clone(),
                ]));
                names.iter().position(|n| *n == name).ok_or_else(|| {
                    WeirError::new(
                        SqlState::UNDEFINED_COLUMN,
                        format!("column \"{name}\" of relation \"{relation}\" does not exist"),
                    )
                })
            })
            .collect::<WeirResult<Vec<_>>>()?
    };
    let format = parse_format(options, legacy_options)?;
    Ok(PendingCopy {
        target,
        columns,
        format,
        data: Vec::new(),
        overflowed: false,
    })
}

fn parse_format(options: &[CopyOption], legacy: &[CopyLegacyOption]) -> WeirResult<CopyFormat> {
    let mut csv = false;
    let mut delimiter = None;
    let mut header = false;
    let mut quote = b'"';
    let mut null = None;
    for option in options {
        match option {
            CopyOption::Format(ident) => match ident.value.to_lowercase().as_str() {
                "csv" => csv = true,
                "text" => csv = false,
                other => {
                    return Err(WeirError::unsupported(
                        format!("COPY format \"{other}\" is not supported"),
                        "use FORMAT text or FORMAT csv",
                    ));
                }
            },
            CopyOption::Delimiter(c) => delimiter = Some(ascii(*c)?),
            CopyOption::Header(h) => header = *h,
            CopyOption::Quote(c) => quote = ascii(*c)?,
            CopyOption::Null(s) => null = Some(s.clone()),
            CopyOption::Encoding(e)
                if e.eq_ignore_ascii_case("utf8") || e.eq_ignore_ascii_case("utf-8") => {}
            other => {
                return Err(WeirError::unsupported(
                    format!("COPY option {other} is not supported"),
                    "supported: FORMAT, DELIMITER, HEADER, QUOTE, NULL",
                ));
            }
        }
    }
    for option in legacy {
        match option {
            CopyLegacyOption::Csv(csv_options) => {
                csv = true;
                for o in csv_options {
                    match o {
                        CopyLegacyCsvOption::Header => header = true,
                        CopyLegacyCsvOption::Quote(c) => quote = ascii(*c)?,
                        other => {
                            return Err(WeirError::unsupported(
                                format!("COPY option {other} is not supported"),
                                "supported: CSV, HEADER, QUOTE, DELIMITER, NULL",
                            ));
                        }
                    }
                }
            }
            CopyLegacyOption::Delimiter(c) => delimiter = Some(ascii(*c)?),
            CopyLegacyOption::Null(s) => null = Some(s.clone()),
            other => {
                return Err(WeirError::unsupported(
                    format!("COPY option {other} is not supported"),
                    "supported: CSV, HEADER, QUOTE, DELIMITER, NULL",
                ));
            }
        }
    }
    if csv {
        if null.as_deref().is_some_and(|n| !n.is_empty()) {
            return Err(WeirError::unsupported(
                "a NULL string other than the empty string is not supported for CSV",
                "write NULLs as empty fields",
            ));
        }
        Ok(CopyFormat::Csv {
            delimiter: delimiter.unwrap_or(b','),
            quote,
            header,
        })
    } else {
        if header {
            return Err(WeirError::unsupported(
                "HEADER is only supported with FORMAT csv",
                "remove HEADER, or use FORMAT csv",
            ));
        }
        Ok(CopyFormat::Text {
            delimiter: delimiter.unwrap_or(b'\t'),
            null: null.unwrap_or_else(|| "\\N".to_string()),
        })
    }
}

fn ascii(c: char) -> WeirResult<u8> {
    u8::try_from(c).ok().filter(u8::is_ascii).ok_or_else(|| {
        WeirError::new(
            SqlState::INVALID_PARAMETER_VALUE,
            format!("COPY delimiter and quote must be one ASCII character, not {c:?}"),
        )
    })
}

/// Decodes the collected data and inserts (or publishes) it; returns the row count.
pub(super) async fn finish(weir: &Weir, copy: PendingCopy, limit_bytes: usize) -> WeirResult<u64> {
    if copy.overflowed {
        return Err(WeirError::new(
            SqlState::PROGRAM_LIMIT_EXCEEDED,
            format!("COPY data exceeds the limit of {limit_bytes} bytes"),
        )
        .with_hint("split the data into several COPY statements; nothing was loaded"));
    }
    let table_schema: SchemaRef = match &copy.target {
        Target::Table(table) => table.schema(),
        Target::Source(source) => source.schema.clone(),
        Target::Topic(_) => Arc::new(Schema::new(
            TOPIC_COLUMNS
                .iter()
                .map(|c| Field::new(*c, DataType::Utf8, true))
                .collect::<Vec<_>>(),
        )),
    };
    // Decode only the named columns (nullable: NOT NULL is checked on insert
    // with a proper error), then fill the others with NULLs.
    let decode_schema: SchemaRef = Arc::new(Schema::new(
        copy.columns
            .iter()
            .map(|&i| {
                let f = table_schema.field(i);
                Field::new(f.name(), f.data_type().clone(), true)
            })
            .collect::<Vec<_>>(),
    ));
    let format = copy.format.clone();
    let data = copy.data;
    let decoded = tokio::task::spawn_blocking(move || decode_copy(&data, &format, decode_schema))
        .await
        .map_err(|e| WeirError::internal(format!("COPY decoder task failed: {e}")))??;
    let rows = decoded.num_rows();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(table_schema.fields().len());
    for (i, field) in table_schema.fields().iter().enumerate() {
        match copy.columns.iter().position(|&c| c == i) {
            Some(pos) => columns.push(decoded.column(pos).clone()),
            None => columns.push(new_null_array(field.data_type(), rows)),
        }
    }
    let batch = RecordBatch::try_new(nullable(&table_schema), columns)
        .map_err(|e| WeirError::internal(format!("assembling COPY rows: {e}")))?;
    if batch.num_rows() == 0 {
        return Ok(0);
    }
    match copy.target {
        Target::Table(table) => table.insert(batch).await,
        Target::Topic(topic) => {
            let messages = super::queue::messages_from_batch(&batch)?;
            let n = messages.len() as u64;
            weir.publish(&topic, messages).await?;
            Ok(n)
        }
        Target::Source(source) => super::stream::publish_rows(&source, &[batch]).await,
    }
}
