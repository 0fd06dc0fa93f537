//! Arrow IPC encoding of a [`ChangeBatch`], the payload of a table's change log.

use std::io::Cursor;

use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;

use crate::types::{ChangeBatch, SqlState, WeirError};

/// Encodes one change batch as a self-describing Arrow IPC stream.
pub fn encode_change(change: &ChangeBatch) -> Result<Vec<u8>, WeirError> {
    let batch = change.to_batch()?;
    let mut buf = Vec::with_capacity(batch.get_array_memory_size() + 512);
    let mut writer = StreamWriter::try_new(&mut buf, &batch.schema())
        .map_err(|e| WeirError::internal(format!("arrow ipc writer: {e}")))?;
    writer
        .write(&batch)
        .map_err(|e| WeirError::internal(format!("arrow ipc write: {e}")))?;
    writer
        .finish()
        .map_err(|e| WeirError::internal(format!("arrow ipc finish: {e}")))?;
    drop(writer);
    Ok(buf)
}

/// Decodes what [`encode_change`] wrote. Bytes come from disk, so every
/// failure is a data-corruption error, never a panic.
pub fn decode_change(bytes: &[u8]) -> Result<Vec<ChangeBatch>, WeirError> {
    let corrupt = |e: arrow::error::ArrowError| {
        WeirError::new(
            SqlState::DATA_CORRUPTED,
            format!("undecodable change record: {e}"),
        )
    };
    let reader = StreamReader::try_new(Cursor::new(bytes), None).map_err(corrupt)?;
    let mut out = Vec::new();
    for batch in reader {
        out.push(ChangeBatch::from_batch(batch.map_err(corrupt)?)?);
    }
    Ok(out)
}
