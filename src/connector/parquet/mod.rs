//! The Parquet sink (`CREATE SINK ... WITH (connector = 'parquet')`): a view's rows as Parquet
//! files in a local directory or an S3-compatible bucket, through `object_store`, exactly once.
//!
//! Life of a row: [`ParquetSink::write`] buffers it as Arrow in the open file of its partition
//! (`partition_by`: Hive-style `col=value/` directories, the column itself left out of the file
//! as Hive, Spark and pyarrow expect). A file closes when its buffered Arrow size reaches
//! `file_size_max` or it has been open for `rollover` ([`ParquetSink::tick`]); closing encodes it
//! with `ArrowWriter` (Snappy) in memory, and the next `tick` or `precommit` puts it at a *staged*
//! path `<prefix>/_weir_staging/<sink>/<epoch>-<seq>.parquet` (dataset readers skip directories
//! starting with `_`). `precommit` returns the staged files with their final paths
//! (`<prefix>/[col=value/]part-<sink>-<epoch:08>-<seq:04>.parquet`) and the still-open rows as
//! Arrow IPC; `commit` renames the staged files to their final paths (idempotently: a staged
//! file that is gone while its final path exists was committed already); `restore` finishes the
//! checkpoint's commit, reloads its open rows and deletes everything else staged.
//!
//! `config.rs` parses the options, `store.rs` opens the object store and classifies its errors.
//! This module never decides when a checkpoint happens, never reads a view, and never makes a
//! file visible before `commit`.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrow::array::{Array, ArrayRef, Int64Array, RecordBatch, StringArray, UInt32Array};
use arrow::compute::kernels::cmp::gt;
use arrow::compute::kernels::zip::zip;
use arrow::compute::{
    can_cast_types, cast, concat_batches, partition, sort_to_indices, take, take_record_batch,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use async_trait::async_trait;
use futures::TryStreamExt;
use object_store::path::{Path as ObjectPath, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::{ArrowSchemaConverter, ArrowWriter};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::connector::api::Sink;
use crate::format::ipc::{decode_change, encode_change};
use crate::format::pgtext::to_pg_text;
use crate::types::{ChangeBatch, SqlState, WeirError, WeirResult};

mod config;
mod store;

pub use config::{OPTIONS, ParquetSinkConfig, ParquetTarget, S3Config};
use store::{build_store, s3_endpoint_text, store_error};

/// Name of the column a `changelog = 'true'` sink adds: `insert` or `delete`.
pub const OP_COLUMN: &str = "op";

/// Directory (under the sink's prefix) that holds files written but not yet committed.
pub const STAGING_DIR: &str = "_weir_staging";

/// The directory value of a NULL partition key, as Hive and Spark spell it.
const NULL_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";

/// All open files of one sink together; past it the largest open file closes early.
const OPEN_BYTES_MAX: usize = 1024 * 1024 * 1024;
/// Closed files waiting for their upload (the store is failing); past it the sink stops.
const CLOSED_BYTES_MAX: usize = 1024 * 1024 * 1024;
/// How long `tick` waits after a failed upload before trying again.
const UPLOAD_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Rows one `write` may produce after expanding weights (a row of weight `w` is `|w|` rows).
const EXPANDED_ROWS_MAX: usize = 16 * 1024 * 1024;
/// First bytes of a [`ParquetSink::precommit`] state, then a version byte.
const STATE_MAGIC: &[u8; 4] = b"WPQS";
const STATE_VERSION: u8 = 1;

/// A file being filled: the rows of one partition since it was opened.
#[derive(Debug)]
struct OpenFile {
    batches: Vec<RecordBatch>,
    /// Arrow memory of `batches`, compared with `file_size_max`.
    bytes: usize,
    opened_at: Instant,
    /// The same instant as wall-clock time, kept in checkpoints so `rollover` spans restarts.
    opened_at_unix_ms: u64,
}

/// A file that is closed and encoded, waiting for its upload to the staged path.
struct ClosedFile {
    file: StagedFile,
    parquet: bytes::Bytes,
}

/// A file put at its staged path, to be renamed to its final path at `commit`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StagedFile {
    epoch: u64,
    staged: String,
    #[serde(rename = "final")]
    final_path: String,
}

/// The JSON head of a [`ParquetSink::precommit`] state; the open files' rows follow it as
/// Arrow IPC streams, one per entry of `open`, in order.
#[derive(Debug, Serialize, Deserialize)]
struct StateHead {
    epoch: u64,
    /// Every file precommitted and not yet committed (this epoch's and any earlier one's whose
    /// commit has not run).
    files: Vec<StagedFile>,
    open: Vec<OpenHead>,
}

#[derive(Debug, Serialize, Deserialize)]
struct OpenHead {
    /// The Hive directory (`col=value`), empty when the sink is not partitioned.
    partition: String,
    opened_at_unix_ms: u64,
}

/// Writes a view's changes as Parquet files; see the module docs for the life of a row.
pub struct ParquetSink {
    config: ParquetSinkConfig,
    /// The sink's name as a path segment (escaped), used in staged and final file names.
    name: String,
    store: Arc<dyn ObjectStore>,
    /// The key prefix inside `store` (empty for a local directory: the store is rooted there).
    root: ObjectPath,
    /// `<root>/_weir_staging/<name>`.
    staging: ObjectPath,
    /// Columns `write` receives.
    input_schema: SchemaRef,
    /// `input_schema` plus `op` for a changelog sink: every batch is rebuilt with it, so
    /// files and checkpoints never depend on how the dataflow named or typed its batches.
    written_schema: SchemaRef,
    /// Index of the `partition_by` column in `input_schema`.
    partition_column: Option<usize>,
    /// Columns of the written rows (`input_schema` + `op`) that go into the files.
    file_columns: Vec<usize>,
    file_schema: SchemaRef,
    props: WriterProperties,
    /// Open files by partition directory (`""` when not partitioned).
    open: BTreeMap<String, OpenFile>,
    open_bytes: usize,
    /// Closed files not yet uploaded (uploaded by `tick` and `precommit`).
    closed: VecDeque<ClosedFile>,
    /// Encoded bytes in `closed`, bounded by [`CLOSED_BYTES_MAX`].
    closed_bytes: usize,
    /// After a failed upload, `tick` tries again no earlier than this.
    upload_retry_at: Option<Instant>,
    /// Uploaded files not yet part of a precommit.
    staged: Vec<StagedFile>,
    /// Precommitted files by epoch, waiting for `commit`.
    precommitted: BTreeMap<u64, Vec<StagedFile>>,
    /// The epoch being written: one past the last precommitted (or restored) one.
    epoch: u64,
    /// Number of the next file closed in `epoch`.
    next_seq: u32,
}

impl fmt::Debug for ParquetSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParquetSink")
            .field("describe", &self.describe())
            .field("epoch", &self.epoch)
            .field("open_bytes", &self.open_bytes)
            .finish_non_exhaustive()
    }
}

impl ParquetSink {
    /// Checks the options against the view's `schema`, builds the object store and proves it
    /// writable by putting and deleting a probe object under the staging prefix.
    ///
    /// Errors: `partition_by` not a column → 42703; an unwritable local path → 42501 (permission)
    /// or 58030, naming the path; a missing bucket → 42704, refused credentials → 42501, an
    /// unreachable endpoint → 08001, each naming the bucket and endpoint.
    pub async fn open(
        config: ParquetSinkConfig,
        schema: SchemaRef,
        sink_name: &str,
    ) -> WeirResult<ParquetSink> {
        let partition_column = match &config.partition_by {
            None => None,
            Some(column) => Some(partition_column(&schema, column)?),
        };
        let mut fields: Vec<Arc<Field>> = schema.fields().iter().cloned().collect();
        if config.changelog {
            if schema.column_with_name(OP_COLUMN).is_some() {
                return Err(WeirError::new(
                    SqlState::DUPLICATE_COLUMN,
                    format!("the view already has a column named \"{OP_COLUMN}\""),
                )
                .with_hint(format!(
                    "a changelog sink adds an \"{OP_COLUMN}\" column; rename the view's column"
                )));
            }
            fields.push(Arc::new(Field::new(OP_COLUMN, DataType::Utf8, false)));
        }
        let written = Arc::new(Schema::new(fields));
        let file_columns: Vec<usize> = (0..written.fields().len())
            .filter(|i| Some(*i) != partition_column)
            .collect();
        let file_schema = Arc::new(
            written
                .project(&file_columns)
                .map_err(|e| WeirError::internal(format!("parquet sink schema: {e}")))?,
        );
        ArrowSchemaConverter::new()
            .convert(&file_schema)
            .map_err(|e| {
                WeirError::unsupported(
                    format!("the view's columns cannot be written as parquet: {e}"),
                    "cast the column to a simpler type in the view",
                )
            })?;
        let name = escape_segment(sink_name);
        let (store, root) = build_store(&config).await?;
        let staging = child(&child(&root, STAGING_DIR)?, &name)?;
        let sink = ParquetSink {
            config,
            name,
            store,
            root,
            staging,
            input_schema: schema,
            written_schema: written,
            partition_column,
            file_columns,
            file_schema,
            props: WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .build(),
            open: BTreeMap::new(),
            open_bytes: 0,
            closed: VecDeque::new(),
            closed_bytes: 0,
            upload_retry_at: None,
            staged: Vec::new(),
            precommitted: BTreeMap::new(),
            epoch: 1,
            next_seq: 0,
        };
        sink.probe().await?;
        Ok(sink)
    }

    async fn probe(&self) -> WeirResult<()> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let probe = child(
            &self.staging,
            &format!("probe-{}-{nanos}", std::process::id()),
        )?;
        self.store
            .put(&probe, PutPayload::from_static(b"weir write probe"))
            .await
            .map_err(|e| self.store_error("write to", &e))?;
        self.store
            .delete(&probe)
            .await
            .map_err(|e| self.store_error("delete from", &e))
    }

    /// Rows of `changes` as they are written: weights expanded (`|w|` copies) and, for a
    /// changelog sink, the `op` column appended.
    fn shape(&self, changes: &ChangeBatch) -> WeirResult<RecordBatch> {
        let rows = &changes.rows;
        if rows.num_columns() != self.input_schema.fields().len() {
            return Err(WeirError::internal(format!(
                "parquet sink got {} columns, the view has {}",
                rows.num_columns(),
                self.input_schema.fields().len()
            )));
        }
        let (rows, weights) = match &changes.weights {
            None => (rows.clone(), None),
            Some(weights) => {
                if !self.config.changelog && weights.values().iter().any(|w| *w < 0) {
                    return Err(WeirError::unsupported(
                        format!(
                            "parquet sink on {} cannot write deletes: the view is updating",
                            self.config.path
                        ),
                        "add EMIT ON WINDOW CLOSE to the view so it only appends, or create \
                         the sink WITH (changelog = 'true') to write deletes as rows with \
                         op = 'delete'",
                    ));
                }
                let (rows, weights) = expand_weights(rows, weights)?;
                (rows, Some(weights))
            }
        };
        let mut columns = rows.columns().to_vec();
        if self.config.changelog {
            columns.push(op_column(weights.as_ref(), rows.num_rows())?);
        }
        RecordBatch::try_new(self.written_schema.clone(), columns).map_err(|e| {
            WeirError::internal(format!(
                "parquet sink got rows that do not match the view's columns: {e}"
            ))
        })
    }

    /// Adds `rows` (already in the file's columns) to the open file of `partition`, closing it
    /// when it reaches `file_size_max`.
    fn append(&mut self, partition: String, rows: RecordBatch) -> WeirResult<()> {
        if rows.num_rows() == 0 {
            return Ok(());
        }
        let bytes = rows.get_array_memory_size();
        let file = self.open.entry(partition.clone()).or_insert_with(|| {
            let opened_at_unix_ms = unix_ms();
            OpenFile {
                batches: Vec::new(),
                bytes: 0,
                opened_at: Instant::now(),
                opened_at_unix_ms,
            }
        });
        file.batches.push(rows);
        file.bytes += bytes;
        self.open_bytes += bytes;
        if file.bytes as u64 >= self.config.file_size_max_bytes {
            self.close(&partition)?;
        }
        Ok(())
    }

    /// Closes the open file of `partition`: encodes it and queues its upload.
    fn close(&mut self, partition: &str) -> WeirResult<()> {
        let Some(file) = self.open.remove(partition) else {
            return Ok(());
        };
        self.open_bytes -= file.bytes;
        let parquet = encode_parquet(&self.file_schema, &file.batches, &self.props)?;
        let (epoch, seq) = (self.epoch, self.next_seq);
        self.next_seq += 1;
        let staged = child(&self.staging, &format!("{epoch:08}-{seq:04}.parquet"))?;
        let dir = if partition.is_empty() {
            self.root.clone()
        } else {
            child(&self.root, partition)?
        };
        let final_path = child(
            &dir,
            &format!("part-{}-{epoch:08}-{seq:04}.parquet", self.name),
        )?;
        self.closed.push_back(ClosedFile {
            file: StagedFile {
                epoch,
                staged: staged.to_string(),
                final_path: final_path.to_string(),
            },
            parquet: bytes::Bytes::from(parquet),
        });
        self.closed_bytes += self.closed.back().map_or(0, |c| c.parquet.len());
        Ok(())
    }

    /// Closes the largest open files while all open files together exceed [`OPEN_BYTES_MAX`].
    fn enforce_open_limit(&mut self) -> WeirResult<()> {
        while self.open_bytes > OPEN_BYTES_MAX {
            let Some(largest) = self
                .open
                .iter()
                .max_by_key(|(_, file)| file.bytes)
                .map(|(partition, _)| partition.clone())
            else {
                return Ok(());
            };
            self.close(&largest)?;
        }
        Ok(())
    }

    /// Puts every closed file at its staged path. A failed upload stays queued for the next
    /// `tick` or `precommit`.
    async fn upload(&mut self) -> WeirResult<()> {
        while let Some(closed) = self.closed.front() {
            let staged = stored_path(&closed.file.staged)?;
            self.store
                .put(&staged, PutPayload::from_bytes(closed.parquet.clone()))
                .await
                .map_err(|e| self.store_error("write to", &e))?;
            if let Some(closed) = self.closed.pop_front() {
                self.closed_bytes -= closed.parquet.len();
                self.staged.push(closed.file);
            }
        }
        Ok(())
    }

    /// Moves one staged file to its final path. Idempotent: a staged file that is gone while
    /// its final path exists was published before.
    async fn publish(&self, file: &StagedFile) -> WeirResult<()> {
        let staged = stored_path(&file.staged)?;
        let final_path = stored_path(&file.final_path)?;
        match self.store.rename(&staged, &final_path).await {
            Ok(()) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => match self.store.head(&final_path).await {
                Ok(_) => Ok(()),
                Err(object_store::Error::NotFound { .. }) => Err(WeirError::new(
                    SqlState::DATA_CORRUPTED,
                    format!(
                        "parquet sink on {}: staged file {} of epoch {} is missing and \
                             was never committed to {}",
                        self.config.path, file.staged, file.epoch, file.final_path
                    ),
                )
                .with_hint(
                    "something else deleted the sink's _weir_staging directory; drop and \
                         recreate the sink to write the view again",
                )),
                Err(e) => Err(self.store_error("read from", &e)),
            },
            Err(e) => Err(self.store_error("commit a file to", &e)),
        }
    }

    /// Deletes every object under the sink's staging prefix.
    async fn clear_staging(&self) -> WeirResult<()> {
        let objects: Vec<_> = self
            .store
            .list(Some(&self.staging))
            .try_collect()
            .await
            .map_err(|e| self.store_error("list", &e))?;
        for object in objects {
            match self.store.delete(&object.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.store_error("delete from", &e)),
            }
        }
        Ok(())
    }

    fn encode_state(&self, epoch: u64) -> WeirResult<Vec<u8>> {
        let mut open = Vec::with_capacity(self.open.len());
        let mut rows = Vec::with_capacity(self.open.len());
        for (partition, file) in &self.open {
            let batch = concat_batches(&self.file_schema, &file.batches).map_err(arrow_internal)?;
            rows.push(encode_change(&ChangeBatch::inserts(batch))?);
            open.push(OpenHead {
                partition: partition.clone(),
                opened_at_unix_ms: file.opened_at_unix_ms,
            });
        }
        let head = StateHead {
            epoch,
            files: self.precommitted.values().flatten().cloned().collect(),
            open,
        };
        let head = serde_json::to_vec(&head)
            .map_err(|e| WeirError::internal(format!("parquet sink state: {e}")))?;
        let mut out =
            Vec::with_capacity(9 + head.len() + rows.iter().map(|r| r.len() + 8).sum::<usize>());
        out.extend_from_slice(STATE_MAGIC);
        out.push(STATE_VERSION);
        out.extend_from_slice(&(head.len() as u32).to_le_bytes());
        out.extend_from_slice(&head);
        for ipc in rows {
            out.extend_from_slice(&(ipc.len() as u64).to_le_bytes());
            out.extend_from_slice(&ipc);
        }
        Ok(out)
    }

    /// Reverses [`ParquetSink::encode_state`]. The bytes come from a checkpoint on disk, so
    /// every failure is 'data corrupted', never a panic.
    fn decode_state(&self, bytes: &[u8]) -> WeirResult<(StateHead, Vec<OpenFile>)> {
        let corrupt = |why: String| {
            WeirError::new(
                SqlState::DATA_CORRUPTED,
                format!(
                    "parquet sink on {}: undecodable checkpoint state: {why}",
                    self.config.path
                ),
            )
        };
        let mut reader = ByteReader { bytes };
        if reader.take(4) != Some(STATE_MAGIC.as_slice())
            || reader.take(1) != Some(&[STATE_VERSION])
        {
            return Err(corrupt("unknown header".into()));
        }
        let head_len = reader.u32().ok_or_else(|| corrupt("truncated".into()))?;
        let head = reader
            .take(head_len as usize)
            .ok_or_else(|| corrupt("truncated".into()))?;
        let head: StateHead = serde_json::from_slice(head).map_err(|e| corrupt(e.to_string()))?;
        let now = Instant::now();
        let now_unix_ms = unix_ms();
        let mut open = Vec::with_capacity(head.open.len());
        for entry in &head.open {
            let len = reader.u64().ok_or_else(|| corrupt("truncated".into()))?;
            let ipc = usize::try_from(len)
                .ok()
                .and_then(|len| reader.take(len))
                .ok_or_else(|| corrupt("truncated".into()))?;
            let mut batches = Vec::new();
            let mut bytes = 0;
            for change in decode_change(ipc)? {
                if change.rows.schema().fields() != self.file_schema.fields() {
                    return Err(corrupt(format!(
                        "open rows of partition '{}' have other columns than the sink",
                        entry.partition
                    )));
                }
                bytes += change.rows.get_array_memory_size();
                batches.push(change.rows);
            }
            let age = Duration::from_millis(now_unix_ms.saturating_sub(entry.opened_at_unix_ms));
            open.push(OpenFile {
                batches,
                bytes,
                opened_at: now.checked_sub(age).unwrap_or(now),
                opened_at_unix_ms: entry.opened_at_unix_ms,
            });
        }
        if !reader.bytes.is_empty() {
            return Err(corrupt("trailing bytes".into()));
        }
        Ok((head, open))
    }

    /// The target as messages name it: the path, and for S3 the endpoint.
    fn target_text(&self) -> String {
        match &self.config.target {
            ParquetTarget::Local { .. } => format!("path \"{}\"", self.config.path),
            ParquetTarget::S3 { bucket, .. } => format!(
                "bucket \"{bucket}\" at {}",
                s3_endpoint_text(&self.config.s3)
            ),
        }
    }

    fn store_error(&self, action: &str, err: &object_store::Error) -> WeirError {
        store_error(&self.config, action, err).with_detail(format!(
            "{} ({})",
            self.target_text(),
            err
        ))
    }
}

#[async_trait]
impl Sink for ParquetSink {
    fn describe(&self) -> String {
        let mut text = format!("parquet {}", self.config.path);
        if let Some(column) = &self.config.partition_by {
            text.push_str(&format!(" partition_by={column}"));
        }
        if self.config.changelog {
            text.push_str(" changelog");
        }
        text
    }

    fn write(&mut self, changes: &ChangeBatch) -> WeirResult<()> {
        if changes.num_rows() == 0 {
            return Ok(());
        }
        let rows = self.shape(changes)?;
        let Some(column) = self.partition_column else {
            let rows = rows.project(&self.file_columns).map_err(arrow_internal)?;
            self.append(String::new(), rows)?;
            return self.enforce_open_limit();
        };
        // Group rows by partition value with kernels: sort the values' text, find the runs of
        // equal values, take each run's rows into a compact batch of its own.
        let keys = partition_keys(rows.column(column))?;
        let order = sort_to_indices(&keys, None, None).map_err(arrow_internal)?;
        let sorted_keys = take(&keys, &order, None).map_err(arrow_internal)?;
        let sorted_text = sorted_keys
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| WeirError::internal("partition keys are not text"))?;
        let runs = partition(std::slice::from_ref(&sorted_keys)).map_err(arrow_internal)?;
        let data = rows.project(&self.file_columns).map_err(arrow_internal)?;
        let name = self.config.partition_by.clone().unwrap_or_default();
        for run in runs.ranges() {
            let indices: UInt32Array = order.slice(run.start, run.end - run.start);
            let part = take_record_batch(&data, &indices).map_err(arrow_internal)?;
            let value = if sorted_text.is_null(run.start) {
                NULL_PARTITION.to_string()
            } else {
                escape_hive(sorted_text.value(run.start))
            };
            self.append(format!("{}={value}", escape_hive(&name)), part)?;
        }
        self.enforce_open_limit()
    }

    async fn tick(&mut self) -> WeirResult<()> {
        let now = Instant::now();
        let due: Vec<String> = self
            .open
            .iter()
            .filter(|(_, file)| now.duration_since(file.opened_at) >= self.config.rollover)
            .map(|(partition, _)| partition.clone())
            .collect();
        for partition in due {
            self.close(&partition)?;
        }
        if self.upload_retry_at.is_some_and(|at| now < at) {
            return Ok(());
        }
        // A store that fails now may answer at the next tick: the closed files wait in memory
        // (up to a bound) and `precommit` fails the checkpoint meanwhile, which the runtime
        // retries; only a backlog past the bound stops the sink.
        match self.upload().await {
            Ok(()) => {
                self.upload_retry_at = None;
                Ok(())
            }
            Err(e) if self.closed_bytes <= CLOSED_BYTES_MAX => {
                tracing::warn!(sink = %self.name, error = %e, "parquet upload failed; retrying");
                self.upload_retry_at = Some(Instant::now() + UPLOAD_RETRY_DELAY);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn precommit(&mut self, epoch: u64) -> WeirResult<Vec<u8>> {
        self.upload().await?;
        let files = std::mem::take(&mut self.staged);
        if !files.is_empty() {
            self.precommitted.entry(epoch).or_default().extend(files);
        }
        let state = self.encode_state(epoch)?;
        // A checkpoint that failed after this call is retried with the same epoch: files closed
        // meanwhile keep counting, so no staged name is ever used twice.
        if epoch + 1 > self.epoch {
            self.epoch = epoch + 1;
            self.next_seq = 0;
        }
        Ok(state)
    }

    async fn commit(&mut self, epoch: u64) -> WeirResult<()> {
        let epochs: Vec<u64> = self.precommitted.range(..=epoch).map(|(e, _)| *e).collect();
        for e in epochs {
            while let Some(file) = self.precommitted.get(&e).and_then(|f| f.last()).cloned() {
                self.publish(&file).await?;
                if let Some(files) = self.precommitted.get_mut(&e) {
                    files.pop();
                }
            }
            self.precommitted.remove(&e);
        }
        Ok(())
    }

    async fn restore(&mut self, epoch: u64, state: Option<&[u8]>) -> WeirResult<()> {
        self.open.clear();
        self.open_bytes = 0;
        self.closed.clear();
        self.closed_bytes = 0;
        self.upload_retry_at = None;
        self.staged.clear();
        self.precommitted.clear();
        self.epoch = epoch + 1;
        self.next_seq = 0;
        if let Some(state) = state {
            let (head, open) = self.decode_state(state)?;
            for file in &head.files {
                self.publish(file).await?;
            }
            for (entry, file) in head.open.into_iter().zip(open) {
                self.open_bytes += file.bytes;
                self.open.insert(entry.partition, file);
            }
        }
        // Files staged after the checkpoint: their rows will be written again.
        self.clear_staging().await
    }
}

/// The `op` column of a changelog sink: `insert` for a positive weight, else `delete`.
fn op_column(weights: Option<&Int64Array>, rows: usize) -> WeirResult<ArrayRef> {
    let Some(weights) = weights else {
        return Ok(Arc::new(StringArray::from(vec!["insert"; rows])));
    };
    let inserts = gt(weights, &Int64Array::new_scalar(0)).map_err(arrow_internal)?;
    zip(
        &inserts,
        &StringArray::new_scalar("insert"),
        &StringArray::new_scalar("delete"),
    )
    .map_err(arrow_internal)
}

/// The index of `column` in `schema`, or 42703 listing the columns.
fn partition_column(schema: &Schema, column: &str) -> WeirResult<usize> {
    let Some((index, field)) = schema.column_with_name(column) else {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        return Err(WeirError::new(
            SqlState::UNDEFINED_COLUMN,
            format!("partition_by column \"{column}\" is not a column of the view"),
        )
        .with_hint(format!("the view's columns: {}", names.join(", "))));
    };
    if !can_cast_types(field.data_type(), &DataType::Utf8) {
        return Err(WeirError::new(
            SqlState::DATATYPE_MISMATCH,
            format!(
                "cannot partition by \"{column}\" of type {}",
                field.data_type()
            ),
        )
        .with_hint("partition by a column of a scalar type (text, integer, date, timestamp)"));
    }
    Ok(index)
}

/// The partition value of every row as text, spelled as PostgreSQL prints it.
fn partition_keys(column: &ArrayRef) -> WeirResult<ArrayRef> {
    cast(&to_pg_text(column), &DataType::Utf8).map_err(arrow_internal)
}

/// `rows` with each row repeated `|weight|` times, and the matching weights. Batches of all
/// ±1 weights (the usual case) come back as they are.
fn expand_weights(
    rows: &RecordBatch,
    weights: &Int64Array,
) -> WeirResult<(RecordBatch, Int64Array)> {
    let values = weights.values();
    if values.iter().all(|w| w.unsigned_abs() == 1) {
        return Ok((rows.clone(), weights.clone()));
    }
    let total: u64 = values.iter().map(|w| w.unsigned_abs()).sum();
    if total > EXPANDED_ROWS_MAX as u64 {
        return Err(WeirError::new(
            SqlState::PROGRAM_LIMIT_EXCEEDED,
            format!("a change of {total} rows is too large for a parquet sink"),
        )
        .with_hint(format!(
            "one change may hold at most {EXPANDED_ROWS_MAX} rows"
        )));
    }
    let mut indices = Vec::with_capacity(total as usize);
    for (row, weight) in values.iter().enumerate() {
        let row = u32::try_from(row).map_err(|_| WeirError::internal("change batch too long"))?;
        indices.extend(std::iter::repeat_n(row, weight.unsigned_abs() as usize));
    }
    let indices = UInt32Array::from(indices);
    let rows = take_record_batch(rows, &indices).map_err(arrow_internal)?;
    let weights = take(weights, &indices, None).map_err(arrow_internal)?;
    let weights = weights
        .as_any()
        .downcast_ref::<Int64Array>()
        .cloned()
        .ok_or_else(|| WeirError::internal("weights are not bigint"))?;
    Ok((rows, weights))
}

fn encode_parquet(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    props: &WriterProperties,
) -> WeirResult<Vec<u8>> {
    let bytes: usize = batches.iter().map(|b| b.get_array_memory_size()).sum();
    let encode_error = |e: parquet::errors::ParquetError| {
        WeirError::internal(format!("encoding a parquet file: {e}"))
    };
    let mut writer = ArrowWriter::try_new(
        Vec::with_capacity(bytes / 2 + 1024),
        schema.clone(),
        Some(props.clone()),
    )
    .map_err(encode_error)?;
    for batch in batches {
        writer.write(batch).map_err(encode_error)?;
    }
    writer.into_inner().map_err(encode_error)
}

/// Percent-encodes what Hive escapes in partition directory values (`/`, `=`, `:`, `%`, ...),
/// so Hive, Spark, pyarrow and DuckDB read the value back.
fn escape_hive(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        let escape = c.is_ascii_control()
            || matches!(
                c,
                '"' | '#' | '%' | '\'' | '*' | '/' | ':' | '=' | '?' | '\\' | '{' | '[' | ']' | '^'
            );
        if escape {
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// A sink name as one path segment: Hive-escaped, and never `.` or `..`.
fn escape_segment(name: &str) -> String {
    let escaped = escape_hive(name);
    if escaped.is_empty() || escaped.chars().all(|c| c == '.') {
        escaped.replace('.', "%2E") + "_"
    } else {
        escaped
    }
}

fn child(dir: &ObjectPath, segment: &str) -> WeirResult<ObjectPath> {
    let part = PathPart::parse(segment).map_err(|e| {
        WeirError::internal(format!("parquet sink path segment \"{segment}\": {e}"))
    })?;
    Ok(dir.clone().join(part))
}

/// A path this sink built and kept as text (in memory or in a checkpoint), read back exactly:
/// `Path::from` would escape the `%` of Hive-escaped values a second time.
fn stored_path(text: &str) -> WeirResult<ObjectPath> {
    ObjectPath::parse(text).map_err(|e| {
        WeirError::new(
            SqlState::DATA_CORRUPTED,
            format!("parquet sink file path \"{text}\" is invalid: {e}"),
        )
    })
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

fn arrow_internal(e: ArrowError) -> WeirError {
    WeirError::internal(format!("parquet sink: {e}"))
}

/// Reads a checkpoint state front to back without panicking on short input.
struct ByteReader<'a> {
    bytes: &'a [u8],
}

impl<'a> ByteReader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    //! The two-phase commit on a local directory, below SQL: what `tests/it/parquet_sink.rs`
    //! cannot reach through pgwire (a restore from a given state, commit run twice).

    use super::config::tests::options;
    use super::*;

    fn files_under(dir: &std::path::Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).expect("read dir").flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let rel = path.strip_prefix(dir).expect("under dir");
                    out.push(rel.display().to_string());
                }
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn staged_files_become_visible_at_commit_and_restore_discards_the_rest() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let path = format!("file://{}", dir.path().display());
        let config = ParquetSinkConfig::from_options(&options(&[
            ("path", &path),
            ("partition_by", "region"),
            ("file_size_max", "1KiB"),
        ]))
        .expect("valid options");
        let schema = Arc::new(Schema::new(vec![
            Field::new("region", DataType::Utf8, true),
            Field::new("n", DataType::Int64, false),
        ]));
        let batch = |regions: Vec<Option<&str>>, n: Vec<i64>| {
            let columns: Vec<ArrayRef> = vec![
                Arc::new(StringArray::from(regions)),
                Arc::new(Int64Array::from(n)),
            ];
            ChangeBatch::inserts(RecordBatch::try_new(schema.clone(), columns).expect("batch"))
        };
        let mut sink = ParquetSink::open(config, schema.clone(), "s")
            .await
            .expect("open");
        sink.restore(0, None).await.expect("fresh start");
        // 200 rows of "eu:1" pass 1 KiB and close a file; "us/x" stays open.
        sink.write(&batch(vec![Some("eu:1"); 200], (0..200).collect()))
            .expect("write");
        sink.write(&batch(vec![Some("us/x"), None], vec![7, 8]))
            .expect("write");
        sink.tick().await.expect("tick");
        let state = sink.precommit(1).await.expect("precommit");
        assert_eq!(
            files_under(dir.path()),
            ["_weir_staging/s/00000001-0000.parquet"]
        );
        sink.commit(1).await.expect("commit");
        sink.commit(1).await.expect("commit again");
        assert_eq!(
            files_under(dir.path()),
            ["region=eu%3A1/part-s-00000001-0000.parquet"]
        );

        // A crash after epoch 1: rows written since are staged, then restore(1) drops them
        // and brings back the open rows of epoch 1.
        sink.write(&batch(vec![Some("eu:1"); 200], (0..200).collect()))
            .expect("write");
        sink.tick().await.expect("tick");
        assert_eq!(files_under(dir.path()).len(), 2);
        let mut recovered = ParquetSink::open(sink.config.clone(), schema.clone(), "s")
            .await
            .expect("open again");
        recovered.restore(1, Some(&state)).await.expect("restore");
        assert_eq!(
            files_under(dir.path()),
            ["region=eu%3A1/part-s-00000001-0000.parquet"]
        );
        let open: Vec<&String> = recovered.open.keys().collect();
        assert_eq!(open, ["region=__HIVE_DEFAULT_PARTITION__", "region=us%2Fx"]);
        let truncated = recovered.decode_state(&state[..state.len() - 1]);
        assert_eq!(
            truncated.expect_err("refused").sqlstate,
            SqlState::DATA_CORRUPTED
        );
    }
}
