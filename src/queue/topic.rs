//! [`Topic`]: a named stream of messages split into partitions, one [`Log`] per partition,
//! with its persisted [`TopicConfig`], key → partition routing, durable publish, retention and
//! a wake-up for consumers waiting on new messages. Also [`QueueError`], the queue's one error
//! type.
//!
//! This file owns the topic directory layout (`topic.json` plus one log directory per
//! partition) and which records readers may see. It never tracks consumer positions or leases
//! (that is `subscription.rs`), never interprets payloads, and never hands a reader a record
//! before it is durable: reads and end offsets stop at the last offset a publish has fsync'd,
//! so a consumer never sees a message that a crash could take back.
//!
//! # Directory layout
//!
//! ```text
//! <dir>/topic.json     the TopicConfig, JSON, replaced atomically (write tmp, fsync, rename)
//! <dir>/<partition>/   one Log per partition, partition = 0 .. partitions-1
//! ```

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::log::{Log, LogConfig, LogError, NewRecord, Record};

/// Name of the file holding a topic's configuration.
const CONFIG_FILE_NAME: &str = "topic.json";

/// Version of the `topic.json` format; a newer file is refused rather than misread.
const CONFIG_FILE_VERSION: u32 = 1;

/// Most partitions a topic may have (each is a directory with open files).
pub const PARTITIONS_MAX: u32 = 1024;

/// Largest `message_bytes_max` a topic may be configured with.
pub const MESSAGE_BYTES_MAX_LIMIT: u32 = 64 << 20;

/// Bytes a log record may hold beyond `message_bytes_max`: the fixed 24-byte record prefix plus
/// room for the headers dead-lettering adds to a message that was at the limit.
const RECORD_SLACK_BYTES: u32 = 64 << 10;

/// Byte limit of one read from a partition log (at least one record is always returned).
const READ_BYTES_MAX: usize = 8 << 20;

/// Encoded framing of one header besides its name and value: `u16` name length + `u32` value
/// length (see `segment.rs`).
const HEADER_FRAMING_BYTES: u64 = 6;

/// What can go wrong in the queue (topics and subscriptions). The engine maps each variant to a
/// SQLSTATE; the doc of each says what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The storage failed (I/O, corruption found by the log, a record over the log's limit).
    /// After an fsync failure the topic or subscription refuses writes until reopened.
    #[error(transparent)]
    Log(#[from] LogError),
    /// No live lease has this id: it was never issued, was already acked, or was issued before
    /// a restart and its message is gone. The caller has nothing to retry.
    #[error("unknown lease \"{lease_id}\"")]
    UnknownLease { lease_id: String },
    /// The lease's ack timeout passed (or it was superseded by a redelivery): the message will
    /// be, or already was, delivered again. Nothing of the call was applied.
    #[error("lease \"{lease_id}\" has expired")]
    LeaseExpired { lease_id: String },
    /// A message of the batch is larger than the topic's `message_bytes_max` (size as defined
    /// by [`message_bytes`]). Nothing of the batch was published.
    #[error("message of {bytes} bytes exceeds the topic's limit of {max} bytes")]
    MessageTooLarge { bytes: u64, max: u32 },
    /// A configuration value is out of range, or a reopened directory does not match the
    /// configuration it was created with.
    #[error("invalid queue configuration: {0}")]
    InvalidConfig(String),
    /// Bytes on disk (topic.json, a subscription state event) do not parse or do not fit the
    /// topic. Opening stops rather than guessing.
    #[error("queue state is corrupt: {0}")]
    Corrupt(String),
    /// The partition number is not below the topic's partition count.
    #[error("partition {partition} does not exist: the topic has {partitions} partitions")]
    UnknownPartition { partition: u32, partitions: u32 },
    /// The operation exists for the other subscription mode only (e.g. `ack` on a stream
    /// subscription, `commit` on a queue subscription).
    #[error("{operation} applies only to subscriptions in {expected} mode")]
    WrongMode {
        operation: &'static str,
        expected: &'static str,
    },
}

impl QueueError {
    fn io(path: &Path, source: io::Error) -> QueueError {
        QueueError::Log(LogError::Io {
            path: path.to_owned(),
            source,
        })
    }
}

/// A topic's settings. Persisted in `topic.json` when the topic is created; only retention can
/// change afterwards ([`Topic::set_retention`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopicConfig {
    /// Number of partitions, 1 ..= [`PARTITIONS_MAX`]. Fixed at creation.
    pub partitions: u32,
    /// Delete whole segments whose newest message is older than this.
    pub retention_ms: Option<u64>,
    /// Delete the oldest whole segments while a partition holds more than this many bytes.
    pub retention_bytes: Option<u64>,
    /// Largest message accepted by [`Topic::publish`], as measured by [`message_bytes`];
    /// 1 ..= [`MESSAGE_BYTES_MAX_LIMIT`].
    pub message_bytes_max: u32,
    /// A partition starts a new segment file past this size; retention deletes whole segments,
    /// so this is also its granularity. At least 1.
    pub segment_bytes_max: u64,
}

impl Default for TopicConfig {
    /// One partition, no retention, 1 MiB messages, 64 MiB segments.
    fn default() -> Self {
        TopicConfig {
            partitions: 1,
            retention_ms: None,
            retention_bytes: None,
            message_bytes_max: 1 << 20,
            segment_bytes_max: 64 << 20,
        }
    }
}

impl TopicConfig {
    fn validate(&self) -> Result<(), QueueError> {
        if self.partitions == 0 || self.partitions > PARTITIONS_MAX {
            return Err(QueueError::InvalidConfig(format!(
                "partitions must be between 1 and {PARTITIONS_MAX}, not {}",
                self.partitions
            )));
        }
        if self.message_bytes_max == 0 || self.message_bytes_max > MESSAGE_BYTES_MAX_LIMIT {
            return Err(QueueError::InvalidConfig(format!(
                "message_bytes_max must be between 1 and {MESSAGE_BYTES_MAX_LIMIT}, not {}",
                self.message_bytes_max
            )));
        }
        if self.segment_bytes_max == 0 {
            return Err(QueueError::InvalidConfig(
                "segment_bytes_max must be at least 1".to_string(),
            ));
        }
        Ok(())
    }
}

/// `topic.json`. Kept apart from [`TopicConfig`] so that the file format only changes on
/// purpose (with `version`).
#[derive(Serialize, Deserialize)]
struct ConfigFile {
    version: u32,
    partitions: u32,
    retention_ms: Option<u64>,
    retention_bytes: Option<u64>,
    message_bytes_max: u32,
    segment_bytes_max: u64,
}

impl ConfigFile {
    fn from_config(config: &TopicConfig) -> ConfigFile {
        ConfigFile {
            version: CONFIG_FILE_VERSION,
            partitions: config.partitions,
            retention_ms: config.retention_ms,
            retention_bytes: config.retention_bytes,
            message_bytes_max: config.message_bytes_max,
            segment_bytes_max: config.segment_bytes_max,
        }
    }

    fn into_config(self) -> TopicConfig {
        TopicConfig {
            partitions: self.partitions,
            retention_ms: self.retention_ms,
            retention_bytes: self.retention_bytes,
            message_bytes_max: self.message_bytes_max,
            segment_bytes_max: self.segment_bytes_max,
        }
    }
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Message {
    /// Routes the message: equal keys always go to the same partition. `None` = round robin.
    pub key: Option<Bytes>,
    pub payload: Bytes,
    /// Name/value pairs in order; names may repeat. Names are at most 65535 bytes.
    pub headers: Vec<(String, Bytes)>,
}

/// Where a published message was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub partition: u32,
    pub offset: u64,
}

/// A snapshot of a topic's size, for system tables and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicStats {
    pub partitions: u32,
    /// Retained messages (published and durable, not yet deleted by retention).
    pub messages: u64,
    /// Bytes of all retained segments, frames included.
    pub bytes: u64,
    /// Per partition: offset of the oldest retained message.
    pub oldest_offsets: Vec<u64>,
    /// Per partition: offset the next published message will get.
    pub next_offsets: Vec<u64>,
}

/// The size a message counts for against `message_bytes_max`: key + payload + for each header
/// its name, its value and 6 bytes of framing. This is the record's encoded size without the
/// log's fixed 24-byte prefix, so the limit bounds what lands on disk.
pub fn message_bytes(message: &Message) -> u64 {
    let key = message.key.as_ref().map_or(0, |k| k.len() as u64);
    let headers: u64 = message
        .headers
        .iter()
        .map(|(name, value)| name.len() as u64 + value.len() as u64 + HEADER_FRAMING_BYTES)
        .sum();
    key + message.payload.len() as u64 + headers
}

/// The partition a keyed message goes to: `crc32(key) % partitions`, with crc32 the IEEE
/// polynomial (crc32fast). Part of the on-disk contract: it must never change, or one key's
/// messages would split across partitions and lose their order.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    crc32fast::hash(key) % partitions.max(1)
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// One partition: its log and how far readers may see.
struct Partition {
    log: Log,
    /// Every record below this offset is durable; readers see nothing at or past it. Raised
    /// (`fetch_max`) by a publisher after its `sync_to` returns.
    visible_end: AtomicU64,
}

/// A durable, partitioned topic. `Send + Sync`; share it as `Arc<Topic>`. Every method but
/// [`Topic::wait_for_messages`] blocks on disk I/O.
pub struct Topic {
    dir: PathBuf,
    name: String,
    partitions: Vec<Partition>,
    /// The current configuration; locked by `set_retention` while it rewrites `topic.json`, so
    /// that the file and this value change together. Readers copy it out.
    config: Mutex<TopicConfig>,
    /// Next partition for a message without a key.
    round_robin: AtomicU64,
    /// Publishers call `notify_waiters` after their records became visible; waiters are
    /// `wait_for_messages` callers. Never closed.
    published: Notify,
}

impl Topic {
    /// Opens the topic in `dir`, creating it (directory, `topic.json`, partition logs) if
    /// `dir/topic.json` does not exist. When it exists, the stored configuration wins and
    /// `config` is ignored; the caller reads the effective one from [`Topic::config`].
    ///
    /// The topic's name (used in dead-letter headers) is the final component of `dir` unless
    /// set with [`Topic::with_name`].
    /// Each partition log is fsync'd on open so that everything recovered is durable before
    /// readers see it. Fails with [`QueueError::InvalidConfig`] for a bad `config`, with
    /// [`QueueError::Corrupt`] for an unreadable `topic.json`, and with [`QueueError::Log`] if a
    /// partition log cannot be opened (also when another `Topic` has it open).
    pub fn open(dir: &Path, config: TopicConfig) -> Result<Topic, QueueError> {
        fs::create_dir_all(dir).map_err(|e| QueueError::io(dir, e))?;
        let path = dir.join(CONFIG_FILE_NAME);
        let config = match fs::read(&path) {
            Ok(bytes) => read_config_file(&path, &bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                config.validate()?;
                write_config_file(dir, &config)?;
                config
            }
            Err(e) => return Err(QueueError::io(&path, e)),
        };
        let log_config = LogConfig {
            segment_bytes_max: config.segment_bytes_max,
            record_bytes_max: config.message_bytes_max.saturating_add(RECORD_SLACK_BYTES),
        };
        let mut partitions = Vec::with_capacity(config.partitions as usize);
        for p in 0..config.partitions {
            let log = Log::open(&dir.join(p.to_string()), log_config)?;
            // Recovered records may only be in the page cache (the process crashed, the OS
            // did not); make them durable before any reader sees them.
            log.sync_all()?;
            let visible_end = AtomicU64::new(log.next_offset());
            partitions.push(Partition { log, visible_end });
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Topic {
            dir: dir.to_owned(),
            name,
            partitions,
            config: Mutex::new(config),
            round_robin: AtomicU64::new(0),
            published: Notify::new(),
        })
    }

    /// Sets the name dead letters from this topic's subscriptions carry in
    /// `weir.dead_letter.topic` (by default the final component of the topic's directory).
    pub fn with_name(mut self, name: impl Into<String>) -> Topic {
        self.name = name.into();
        self
    }

    /// The topic's name (see [`Topic::with_name`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The effective configuration (as stored in `topic.json`).
    pub fn config(&self) -> TopicConfig {
        *self.lock_config()
    }

    /// Changes retention and persists it (atomically replacing `topic.json`) before returning.
    /// Takes effect at the next [`Topic::apply_retention`].
    pub fn set_retention(
        &self,
        retention_ms: Option<u64>,
        retention_bytes: Option<u64>,
    ) -> Result<(), QueueError> {
        let mut config = self.lock_config();
        let mut changed = *config;
        changed.retention_ms = retention_ms;
        changed.retention_bytes = retention_bytes;
        write_config_file(&self.dir, &changed)?;
        *config = changed;
        Ok(())
    }

    /// Number of partitions.
    pub fn partitions(&self) -> u32 {
        self.partitions.len() as u32
    }

    /// Publishes `messages`, durable when this returns: each is appended to its partition
    /// (keyed: [`partition_for_key`]; no key: round robin), then every touched partition is
    /// synced (group commit: concurrent publishers share fsyncs). Returns where each message
    /// went, in input order; messages of one call to one partition get consecutive offsets in
    /// input order. Timestamps are the wall clock at the call.
    ///
    /// Rejects the whole batch with [`QueueError::MessageTooLarge`] if any message exceeds
    /// `message_bytes_max`. A storage error after some partitions were appended leaves those
    /// appended (they may become visible with a later publish): callers retrying get
    /// at-least-once. Wakes [`Topic::wait_for_messages`] callers.
    pub fn publish(&self, messages: &[Message]) -> Result<Vec<Published>, QueueError> {
        let max = self.config().message_bytes_max;
        for message in messages {
            let bytes = message_bytes(message);
            if bytes > u64::from(max) {
                return Err(QueueError::MessageTooLarge { bytes, max });
            }
        }
        self.append_messages(messages)
    }

    /// [`Topic::publish`] without the `message_bytes_max` check (the log's own record limit
    /// still applies): dead letters carry extra headers and must not be refused for them.
    pub(crate) fn publish_unchecked(
        &self,
        messages: &[Message],
    ) -> Result<Vec<Published>, QueueError> {
        self.append_messages(messages)
    }

    fn append_messages(&self, messages: &[Message]) -> Result<Vec<Published>, QueueError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let timestamp_ms = now_ms();
        let n = self.partitions();
        let mut batches: Vec<Vec<NewRecord>> = vec![Vec::new(); n as usize];
        let mut placement = Vec::with_capacity(messages.len());
        for message in messages {
            let p = match &message.key {
                Some(key) => partition_for_key(key, n),
                None => (self.round_robin.fetch_add(1, Ordering::Relaxed) % u64::from(n)) as u32,
            };
            let batch = &mut batches[p as usize];
            placement.push((p, batch.len() as u64));
            batch.push(NewRecord {
                timestamp_ms,
                key: message.key.clone(),
                headers: message.headers.clone(),
                payload: message.payload.clone(),
            });
        }
        let mut starts = vec![0u64; n as usize];
        let mut appended = Vec::new();
        for (p, batch) in batches.iter().enumerate() {
            if !batch.is_empty() {
                let range = self.partitions[p].log.append(batch)?;
                starts[p] = range.start;
                appended.push((p, range.end));
            }
        }
        for &(p, end) in &appended {
            let partition = &self.partitions[p];
            partition.log.sync_to(end)?;
            partition.visible_end.fetch_max(end, Ordering::AcqRel);
        }
        self.published.notify_waiters();
        Ok(placement
            .into_iter()
            .map(|(partition, index)| Published {
                partition,
                offset: starts[partition as usize] + index,
            })
            .collect())
    }

    /// Reads up to `max_records` durable records of `partition` with offset >= `from`, in
    /// offset order (also capped at 8 MiB, but at least one record if any). `from` below the
    /// start offset reads from the start offset (compare the first offset to notice the gap
    /// retention made); `from` at or past the end returns nothing.
    pub fn read(
        &self,
        partition: u32,
        from: u64,
        max_records: usize,
    ) -> Result<Vec<Record>, QueueError> {
        let part = self.partition(partition)?;
        let end = part.visible_end.load(Ordering::Acquire);
        if from >= end {
            return Ok(Vec::new());
        }
        let max_records = max_records.min(usize::try_from(end - from).unwrap_or(usize::MAX));
        let mut records = part.log.read(from, max_records, READ_BYTES_MAX)?;
        records.retain(|r| r.offset < end);
        Ok(records)
    }

    /// Offset of the oldest retained record of `partition` (0 for a partition that does not
    /// exist).
    pub fn start_offset(&self, partition: u32) -> u64 {
        self.partitions
            .get(partition as usize)
            .map_or(0, |p| p.log.start_offset())
    }

    /// Offset after the newest durable record of `partition`: the offset the next published
    /// message will get (0 for a partition that does not exist).
    pub fn end_offset(&self, partition: u32) -> u64 {
        self.partitions
            .get(partition as usize)
            .map_or(0, |p| p.visible_end.load(Ordering::Acquire))
    }

    /// The first offset of `partition` whose record has a timestamp >= `timestamp_ms`, or the
    /// end offset if there is none. Timestamps are publish times, so they only approximately
    /// grow with offsets (concurrent publishers); this returns the first match in offset order.
    pub fn offset_for_timestamp(
        &self,
        partition: u32,
        timestamp_ms: i64,
    ) -> Result<u64, QueueError> {
        let part = self.partition(partition)?;
        let end = part.visible_end.load(Ordering::Acquire);
        let Some(segment) = part
            .log
            .segments()
            .into_iter()
            .find(|s| s.max_timestamp_ms >= timestamp_ms)
        else {
            return Ok(end);
        };
        let mut from = segment.base_offset;
        loop {
            let records = self.read(partition, from, 1024)?;
            let Some(last) = records.last() else {
                return Ok(end);
            };
            if let Some(found) = records.iter().find(|r| r.timestamp_ms >= timestamp_ms) {
                return Ok(found.offset);
            }
            from = last.offset + 1;
        }
    }

    /// Sizes and offsets of every partition.
    pub fn stats(&self) -> TopicStats {
        let mut stats = TopicStats {
            partitions: self.partitions(),
            messages: 0,
            bytes: 0,
            oldest_offsets: Vec::with_capacity(self.partitions.len()),
            next_offsets: Vec::with_capacity(self.partitions.len()),
        };
        for part in &self.partitions {
            let start = part.log.start_offset();
            let end = part.visible_end.load(Ordering::Acquire);
            stats.messages += end.saturating_sub(start);
            stats.bytes += part.log.segments().iter().map(|s| s.bytes).sum::<u64>();
            stats.oldest_offsets.push(start);
            stats.next_offsets.push(end);
        }
        stats
    }

    /// Applies the retention policy: in each partition deletes the oldest whole segments whose
    /// newest record is more than `retention_ms` older than `now_ms`, then the oldest while the
    /// partition holds more than `retention_bytes`. Never deletes a partition's active (last)
    /// segment. Subscriptions positioned below the new start skip to it. Returns how many
    /// segments were deleted.
    pub fn apply_retention(&self, now_ms: i64) -> Result<usize, QueueError> {
        let config = self.config();
        if config.retention_ms.is_none() && config.retention_bytes.is_none() {
            return Ok(0);
        }
        let mut deleted = 0;
        for part in &self.partitions {
            let segments = part.log.segments();
            let closed = &segments[..segments.len().saturating_sub(1)];
            let mut drop_count = 0;
            if let Some(retention_ms) = config.retention_ms {
                let cutoff = now_ms.saturating_sub(i64::try_from(retention_ms).unwrap_or(i64::MAX));
                drop_count = closed
                    .iter()
                    .take_while(|s| s.max_timestamp_ms < cutoff)
                    .count();
            }
            if let Some(retention_bytes) = config.retention_bytes {
                let mut total: u64 = segments.iter().map(|s| s.bytes).sum();
                total -= closed[..drop_count].iter().map(|s| s.bytes).sum::<u64>();
                while drop_count < closed.len() && total > retention_bytes {
                    total -= closed[drop_count].bytes;
                    drop_count += 1;
                }
            }
            if drop_count > 0 {
                deleted += part
                    .log
                    .truncate_before(closed[drop_count - 1].next_offset)?;
            }
        }
        Ok(deleted)
    }

    /// Returns once any partition's end offset is beyond the caller's `seen[partition]` (a
    /// missing entry counts as 0), or at `deadline`, whichever comes first. Cancel-safe and
    /// holds no lock while waiting; never misses a publish that happens after it was called.
    pub async fn wait_for_messages(&self, seen: &[u64], deadline: tokio::time::Instant) {
        loop {
            let mut notified = pin!(self.published.notified());
            // Register before checking, so a publish between the check and the await still
            // wakes this waiter.
            notified.as_mut().enable();
            let moved = (0..self.partitions())
                .any(|p| self.end_offset(p) > seen.get(p as usize).copied().unwrap_or(0));
            if moved {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    /// Makes every appended record of every partition durable (used at shutdown).
    pub fn sync_all(&self) -> Result<(), QueueError> {
        for part in &self.partitions {
            part.log.sync_all()?;
        }
        Ok(())
    }

    fn partition(&self, partition: u32) -> Result<&Partition, QueueError> {
        self.partitions
            .get(partition as usize)
            .ok_or(QueueError::UnknownPartition {
                partition,
                partitions: self.partitions(),
            })
    }

    fn lock_config(&self) -> MutexGuard<'_, TopicConfig> {
        // A plain value: a panic elsewhere cannot leave it half-written.
        self.config.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topic")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("config", &self.config())
            .finish_non_exhaustive()
    }
}

fn read_config_file(path: &Path, bytes: &[u8]) -> Result<TopicConfig, QueueError> {
    let file: ConfigFile = serde_json::from_slice(bytes)
        .map_err(|e| QueueError::Corrupt(format!("{}: {e}", path.display())))?;
    if file.version != CONFIG_FILE_VERSION {
        return Err(QueueError::Corrupt(format!(
            "{}: unsupported version {}",
            path.display(),
            file.version
        )));
    }
    let config = file.into_config();
    config
        .validate()
        .map_err(|e| QueueError::Corrupt(format!("{}: {e}", path.display())))?;
    Ok(config)
}

/// Replaces `dir/topic.json` atomically and durably: write a temporary file, fsync it, rename
/// it over the old one, fsync the directory.
fn write_config_file(dir: &Path, config: &TopicConfig) -> Result<(), QueueError> {
    let bytes = serde_json::to_vec_pretty(&ConfigFile::from_config(config))
        .map_err(|e| QueueError::InvalidConfig(format!("cannot encode topic config: {e}")))?;
    let tmp = dir.join(format!("{CONFIG_FILE_NAME}.tmp"));
    let path = dir.join(CONFIG_FILE_NAME);
    let mut file = fs::File::create(&tmp).map_err(|e| QueueError::io(&tmp, e))?;
    file.write_all(&bytes)
        .map_err(|e| QueueError::io(&tmp, e))?;
    file.sync_all().map_err(|e| QueueError::io(&tmp, e))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(|e| QueueError::io(&path, e))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| QueueError::io(dir, e))?;
    Ok(())
}
