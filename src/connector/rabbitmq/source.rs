//! The RabbitMQ source: a queue (classic or quorum) or a stream queue read over AMQP 0.9.1.
//!
//! The ingest does not feed views directly: it *appends* every delivery to the source's own
//! durable Weir topic (through [`IngestLog`], which the engine implements over the topic), and
//! views, `SELECT`, `FLUSH`, dead letters and monitors read that topic like any other source. The
//! local log is the write-ahead buffer, so a view's positions are log offsets. In queue mode a
//! message is acknowledged to RabbitMQ only after its append returned (fsync'd) *and*, with
//! `ack = 'checkpoint'` (the default), once every reader's committed checkpoint covers its
//! offset ([`AckGate`]).
//!
//! What a stored message carries: the AMQP body as the payload, and as headers (values as
//! UTF-8 text): `amqp.exchange`, `amqp.routing_key`, `amqp.redelivered` (`true`/`false`), and when
//! the producer set them `amqp.message_id`, `amqp.timestamp` (seconds since the epoch, decimal),
//! `amqp.correlation_id`, `amqp.content_type`, `amqp.type`, `amqp.app_id`, and each AMQP header as
//! `amqp.header.<name>` (strings as they are, numbers in decimal, tables and arrays as JSON).
//! In stream mode the stream offset is stored as `x-stream-offset`, in decimal.
//!
//! # Exactly once, stream mode
//! On start the ingest reads the newest message of the topic and resumes the stream at its
//! `x-stream-offset` + 1 (the `start` option applies only while the topic is empty). RabbitMQ
//! delivers from the start of a chunk, so deliveries below the next expected offset are dropped.
//! Acks are only credit for a stream. Every stored message records its own position, so a crash
//! at any point (even mid-append: the log cuts a torn tail) resumes exactly after the last
//! durable message: no loss, no duplicates, by construction.
//!
//! # Exactly once, queue mode
//! Deliveries are batched (up to `prefetch`, or what has arrived when the channel is momentarily
//! empty), the batch is appended (one call, one fsync), held until the readers' checkpoints
//! cover it (`ack = 'checkpoint'`), then acknowledged with one
//! `basic.ack(last tag, multiple)`, then a `basic.qos` round trip on the same channel proves the
//! broker processed the ack (it handles a channel's frames in order), and only then is
//! "acknowledged through offset X" recorded ([`IngestLog::set_acked_through`]). Nothing is ever
//! acknowledged before it is durable, so nothing is lost. A crash (or a lost connection) between
//! the append and the known ack leaves messages in the log that RabbitMQ may deliver again, with
//! `redelivered = true`. So each session starts by loading the log's messages after the marker as
//! a multiset of fingerprints (payload and every stored header but `amqp.redelivered`); while
//! deliveries arrive with `redelivered = true`, one whose fingerprint is in the multiset is
//! acknowledged and skipped (and taken out of the multiset); the first delivery with
//! `redelivered = false` ends the check.
//!
//! Residual risk, stated honestly: a redelivered message that is byte-identical (same body,
//! properties and headers) to one that was appended *and* acknowledged in the crash window, but
//! that is a different message, is wrongly skipped. Producers that set a unique `message_id`
//! make this impossible. The check also relies on RabbitMQ delivering requeued messages before
//! new ones, which classic and quorum queues do for a single consumer.
//!
//! # Never
//! This module never acknowledges a message before its append returned, never panics on broker
//! input (names and values are validated, header values rendered, never unwrapped), never gives
//! up: a failed connection or channel is retried with backoff (100 ms doubling to 5 s), and
//! [`IngestStatus`] says what is happening.

use std::collections::HashMap;
use std::convert::Infallible;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, Consumer, ExchangeKind};

use super::{
    AckAfter, AckGate, BACKOFF_FIRST, BACKOFF_MAX, RECOVERY_FINGERPRINTS_MAX,
    RECOVERY_PAGE_MESSAGES, RabbitMqConfig, RabbitMqMode, StreamStart, amqp_kind, channel_error,
    close_gracefully, connect, is_soft, open_channel, short,
};
use crate::types::{SqlState, WeirError, WeirResult};

/// Stored header names (see the module docs).
pub const HEADER_STREAM_OFFSET: &str = "x-stream-offset";

pub const HEADER_REDELIVERED: &str = "amqp.redelivered";

/// One message as the source's log stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestMessage {
    pub payload: Bytes,
    /// Name/value pairs (see the module docs for the names).
    pub headers: Vec<(String, Bytes)>,
}

impl IngestMessage {
    fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The stream offset stored with the message (stream mode).
    fn stream_offset(&self) -> Option<u64> {
        std::str::from_utf8(self.header(HEADER_STREAM_OFFSET)?)
            .ok()?
            .parse()
            .ok()
    }

    /// What identifies a message across redeliveries: the payload and every header but the
    /// redelivered flag (which is what changes).
    fn fingerprint(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        self.payload.hash(&mut hasher);
        for (name, value) in &self.headers {
            if name != HEADER_REDELIVERED {
                name.hash(&mut hasher);
                value.hash(&mut hasher);
            }
        }
        hasher.finish()
    }
}

/// The source's durable log, as the ingest sees it (the engine implements it over the source's
/// topic; this module may not import `queue`). Every method may block on disk I/O: the ingest
/// calls them on the blocking pool.
pub trait IngestLog: Send + Sync + 'static {
    /// Appends `messages`, in order, at the end of the log, durably: when this returns `Ok`,
    /// every message is fsync'd and readers may see it. One call is one fsync. Returns the
    /// offset of the last message. On `Err` a prefix may still be on disk (and become visible
    /// later), so the caller must acknowledge none of them. `messages` is never empty.
    fn append(&self, messages: Vec<IngestMessage>) -> WeirResult<u64>;

    /// Whether the log takes `message` (its per-message size limit).
    fn fits(&self, message: &IngestMessage) -> bool;

    /// The offset the next appended message will get.
    fn end_offset(&self) -> u64;

    /// Up to `max` durable messages with offset >= `from`, in offset order, with their offsets
    /// (from below the oldest retained offset reads from the oldest).
    fn read(&self, from: u64, max: usize) -> WeirResult<Vec<(u64, IngestMessage)>>;

    /// The queue-mode marker: every message at or below this offset is known to be acknowledged
    /// to RabbitMQ. `None` if never written (or unreadable: the caller then checks more).
    fn acked_through(&self) -> WeirResult<Option<u64>>;

    /// Replaces the marker atomically (write + rename). Need not be fsync'd: an older marker
    /// after a crash only widens the window of fingerprints checked.
    fn set_acked_through(&self, offset: u64) -> WeirResult<()>;
}

/// What the ingest is doing, shared with the engine (`weir_sources`). Written only by the
/// ingest task; read by anyone.
#[derive(Debug, Default)]
pub struct IngestStatus {
    /// `connecting`, `running`, `reconnecting (attempt N): <error>`.
    state: Mutex<String>,
    last_error: Mutex<Option<String>>,
    received: AtomicU64,
    appended: AtomicU64,
    acked: AtomicU64,
    duplicates: AtomicU64,
    rejected: AtomicU64,
    reconnects: AtomicU64,
}

/// A copy of [`IngestStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestSnapshot {
    pub state: String,
    pub last_error: Option<String>,
    /// Deliveries received from RabbitMQ (redeliveries and dropped stream positions included).
    pub received: u64,
    /// Messages appended to the source's log.
    pub appended: u64,
    /// Deliveries acknowledged (queue mode: known processed by the broker; stream: credit).
    pub acked: u64,
    /// Redeliveries of appended messages and stream positions read twice, dropped.
    pub duplicates: u64,
    /// Messages larger than the log's limit: rejected without requeue (queue mode: RabbitMQ
    /// dead-letters them if the queue has a dead-letter exchange) or skipped (stream mode).
    pub rejected: u64,
    /// Times the connection or channel failed and the ingest started again.
    pub reconnects: u64,
}

impl IngestStatus {
    pub fn new() -> IngestStatus {
        let status = IngestStatus::default();
        status.set_state("connecting");
        status
    }

    pub fn snapshot(&self) -> IngestSnapshot {
        IngestSnapshot {
            state: lock(&self.state).clone(),
            last_error: lock(&self.last_error).clone(),
            received: self.received.load(Ordering::Relaxed),
            appended: self.appended.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
        }
    }

    fn set_state(&self, state: impl Into<String>) {
        *lock(&self.state) = state.into();
    }

    fn set_error(&self, error: impl Into<String>) {
        *lock(&self.last_error) = Some(error.into());
    }

    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Connects once and prepares the queue as the ingest would (declaring it and the exchange with
/// `declare = 'true'`, binding; a stream source also starts a consumer, which only a stream
/// queue accepts), then disconnects. Used at `CREATE SOURCE` time so that a source that cannot
/// read fails there: 08001 unreachable, 28P01 login refused, 42704 missing queue or exchange,
/// 42809 a queue of the wrong type.
pub async fn check(config: &RabbitMqConfig, source: &str) -> WeirResult<()> {
    let connection = connect(config, source).await?;
    match prepare(&connection, config).await {
        Ok(channel) => {
            let consumed = if config.mode == RabbitMqMode::Stream {
                // Only a stream takes the offset argument; reading from 'next' consumes nothing.
                consume(&channel, config, Some(AMQPValue::LongString("next".into())))
                    .await
                    .map(|_| ())
            } else {
                Ok(())
            };
            close_gracefully(Some(&channel), &connection).await;
            consumed
        }
        Err(e) => {
            close_gracefully(None, &connection).await;
            Err(e)
        }
    }
}

/// The ingest: runs until the task is aborted (the source dropped, the server stopping),
/// reconnecting with backoff after every failure.
pub async fn run(
    config: RabbitMqConfig,
    source: String,
    log: Arc<dyn IngestLog>,
    status: Arc<IngestStatus>,
    gate: Arc<AckGate>,
) {
    let mut progress = Progress::default();
    let mut attempt: u32 = 0;
    let mut backoff = BACKOFF_FIRST;
    loop {
        let mut running = false;
        let Err(error) = session(
            &config,
            &source,
            &log,
            &status,
            &gate,
            &mut progress,
            &mut running,
        )
        .await;
        if running {
            // The broker worked until now: start the backoff over.
            attempt = 0;
            backoff = BACKOFF_FIRST;
        }
        attempt = attempt.saturating_add(1);
        let text = match &error.hint {
            Some(hint) => format!("{} ({hint})", error.message),
            None => error.message.clone(),
        };
        tracing::warn!(source = %source, attempt, error = %text, "rabbitmq ingest: reconnecting");
        status.set_error(text.clone());
        status.set_state(format!("reconnecting (attempt {attempt}): {text}"));
        status.reconnects.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(backoff).await; // backoff between attempts, not synchronisation
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// What the ingest knows across sessions of one process.
#[derive(Debug, Default)]
struct Progress {
    /// Queue mode: the acknowledged-through marker, once loaded (`Some(None)`: never written).
    acked_through: Option<Option<u64>>,
    /// Stream mode: the next stream offset to store, once known.
    stream_next: Option<u64>,
    /// Stream mode: `stream_next` was loaded from the log.
    stream_loaded: bool,
}

/// What one session of the ingest works with.
struct Session<'a> {
    config: &'a RabbitMqConfig,
    channel: &'a Channel,
    log: &'a Arc<dyn IngestLog>,
    status: &'a IngestStatus,
    gate: &'a AckGate,
}

/// One connection: connect, prepare, consume until something fails. `running` is set once
/// consuming started.
async fn session(
    config: &RabbitMqConfig,
    source: &str,
    log: &Arc<dyn IngestLog>,
    status: &IngestStatus,
    gate: &AckGate,
    progress: &mut Progress,
    running: &mut bool,
) -> WeirResult<Infallible> {
    let connection = connect(config, source).await?;
    let channel = match prepare(&connection, config).await {
        Ok(channel) => channel,
        Err(e) => {
            close_gracefully(None, &connection).await;
            return Err(e);
        }
    };
    let session = Session {
        config,
        channel: &channel,
        log,
        status,
        gate,
    };
    let Err(error) = match config.mode {
        RabbitMqMode::Queue => queue_session(&session, progress, running).await,
        RabbitMqMode::Stream => stream_session(&session, progress, running).await,
    };
    // Unacknowledged deliveries go back to the queue when the channel closes.
    close_gracefully(Some(&channel), &connection).await;
    Err(error)
}

/// Runs a blocking log call on the blocking pool.
async fn blocking<T: Send + 'static>(
    log: &Arc<dyn IngestLog>,
    f: impl FnOnce(&dyn IngestLog) -> WeirResult<T> + Send + 'static,
) -> WeirResult<T> {
    let log = log.clone();
    tokio::task::spawn_blocking(move || f(log.as_ref()))
        .await
        .map_err(|e| WeirError::internal(format!("source log task: {e}")))?
}

fn append_error(e: WeirError) -> WeirError {
    WeirError::new(
        e.sqlstate,
        format!("appending to the source's log failed: {}", e.message),
    )
    .with_hint("nothing was acknowledged; RabbitMQ keeps the messages and the ingest retries")
}

/// A batch of deliveries appended (or skipped as duplicates) whose acknowledgement may wait
/// for a checkpoint.
struct HeldBatch {
    /// Its last delivery tag (acknowledged with `multiple`).
    tag: u64,
    /// The log offset a checkpoint must pass: the newest appended so far (a skipped
    /// redelivery is in the log below it); `None` while the log is empty.
    needed: Option<u64>,
    /// The offset of the batch's own last appended message: the acknowledged-through marker
    /// moves there (not for a batch of redeliveries only: more of the crash window may still
    /// be redelivered, and the marker must not pass them).
    marker: Option<u64>,
    /// Deliveries it settles.
    count: usize,
}

async fn queue_session(
    session: &Session<'_>,
    progress: &mut Progress,
    running: &mut bool,
) -> WeirResult<Infallible> {
    let Session {
        config,
        channel,
        log,
        status,
        gate,
    } = *session;
    let acked_through = match progress.acked_through {
        Some(known) => known,
        None => {
            let loaded = blocking(log, |l| l.acked_through()).await?;
            progress.acked_through = Some(loaded);
            loaded
        }
    };
    let mut redeliveries = Redeliveries::load(log, acked_through).await?;
    let mut consumer = start_consuming(channel, config, None, status, running).await?;
    let mut newest = blocking(log, |l| Ok(l.end_offset())).await?.checked_sub(1);
    let mut held = std::collections::VecDeque::<HeldBatch>::new();
    // When the readers were last asked for a checkpoint, and what they covered then.
    let mut asked: Option<(tokio::time::Instant, Option<u64>)> = None;
    loop {
        let batch = if held.is_empty() {
            next_batch(config, &mut consumer, status).await?
        } else {
            // next_batch is cancel-safe: it awaits only before taking the first delivery.
            tokio::select! {
                batch = next_batch(config, &mut consumer, status) => batch?,
                _ = gate.changed() => Vec::new(),
                _ = tokio::time::sleep(HOLD_RECHECK) => Vec::new(),
            }
        };
        let mut messages = Vec::with_capacity(batch.len());
        let mut last_kept = None;
        let mut too_large = Vec::new();
        let mut duplicates = 0;
        for delivery in &batch {
            // A stream marks every delivery with its offset. (A producer setting a header of
            // that name on a classic queue would stop this source: reported in its status.)
            if header_value(delivery, HEADER_STREAM_OFFSET).is_some() {
                return Err(wrong_type(config, true));
            }
            let message = to_message(delivery, None);
            if redeliveries.skip(&message, delivery.redelivered) {
                duplicates += 1;
                last_kept = Some(delivery.delivery_tag);
                continue;
            }
            if !log.fits(&message) {
                too_large.push(delivery.delivery_tag);
                continue;
            }
            last_kept = Some(delivery.delivery_tag);
            messages.push(message);
        }
        let appended = messages.len();
        let mut marker = None;
        if !messages.is_empty() {
            let last = blocking(log, move |l| l.append(messages))
                .await
                .map_err(append_error)?;
            (newest, marker) = (Some(last), Some(last));
        }
        IngestStatus::add(&status.appended, appended);
        IngestStatus::add(&status.duplicates, duplicates);
        for tag in &too_large {
            channel
                .basic_reject(*tag, BasicRejectOptions { requeue: false })
                .await
                .map_err(|e| channel_error(config, "rejecting a message on", &e))?;
        }
        if !too_large.is_empty() {
            IngestStatus::add(&status.rejected, too_large.len());
            status.set_error(format!(
                "{} message(s) larger than the source's message size limit were rejected",
                too_large.len()
            ));
        }
        if let Some(tag) = last_kept {
            held.push_back(HeldBatch {
                tag,
                needed: newest,
                marker,
                count: batch.len() - too_large.len(),
            });
        }
        // What may be acknowledged now: everything (ack = 'append'), or what every reader's
        // committed checkpoint covers.
        let covered = match config.ack {
            AckAfter::Append => None,
            AckAfter::Checkpoint => Some(gate.covered()),
        };
        let due = held
            .iter()
            .take_while(|h| match (covered, h.needed) {
                (None, _) | (_, None) => true,
                (Some(covered), Some(offset)) => covered.is_some_and(|c| offset < c),
            })
            .count();
        if due > 0 {
            acknowledge(session, progress, held.drain(..due)).await?;
        }
        // RabbitMQ stops delivering at `prefetch` unacknowledged messages: from half of them
        // on, ask the readers for a checkpoint — again once they answered (what they cover
        // moved) or after HOLD_RECHECK.
        let waiting: usize = held.iter().map(|h| h.count).sum();
        // `covered` is only known (Some) with ack = 'checkpoint'.
        if let Some(covered) = covered
            && waiting * 2 >= usize::from(config.prefetch)
        {
            let ask = match asked {
                None => true,
                Some((at, then)) => then != covered || at.elapsed() >= HOLD_RECHECK,
            };
            if ask {
                gate.want_checkpoint();
                asked = Some((tokio::time::Instant::now(), covered));
            }
        }
    }
}

/// How often held acknowledgements are looked at again when nothing woke the ingest, and at
/// most how often it asks the readers for a checkpoint.
const HOLD_RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Acknowledges the deliveries of `due` (oldest first) with one `basic.ack(last tag,
/// multiple)`, proves the broker processed it (a `basic.qos` round trip on the same channel:
/// the broker handles a channel's frames in order), then records "acknowledged through".
async fn acknowledge(
    session: &Session<'_>,
    progress: &mut Progress,
    due: impl Iterator<Item = HeldBatch>,
) -> WeirResult<()> {
    let Session {
        config,
        channel,
        log,
        status,
        ..
    } = *session;
    let (mut tag, mut through, mut count) = (0, None, 0);
    for h in due {
        (tag, through, count) = (h.tag, h.marker.or(through), count + h.count);
    }
    channel
        .basic_ack(tag, BasicAckOptions { multiple: true })
        .await
        .map_err(|e| channel_error(config, "acknowledging on", &e))?;
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| channel_error(config, "confirming acknowledgements on", &e))?;
    IngestStatus::add(&status.acked, count);
    if let Some(offset) = through
        && progress.acked_through != Some(Some(offset))
    {
        progress.acked_through = Some(Some(offset));
        if let Err(e) = blocking(log, move |l| l.set_acked_through(offset)).await {
            // Only widens the duplicate check after a crash; the ingest goes on.
            tracing::warn!(error = %e, "rabbitmq ingest: writing the acknowledged-through marker");
            status.set_error(format!(
                "writing the acknowledged-through marker: {}",
                e.message
            ));
        }
    }
    Ok(())
}

async fn stream_session(
    session: &Session<'_>,
    progress: &mut Progress,
    running: &mut bool,
) -> WeirResult<Infallible> {
    let Session {
        config,
        channel,
        log,
        status,
        ..
    } = *session;
    if !progress.stream_loaded {
        progress.stream_next = last_stream_offset(log).await?.map(|o| o.saturating_add(1));
        if progress.stream_next.is_none()
            && let StreamStart::Offset(n) = config.start
        {
            progress.stream_next = Some(n);
        }
        progress.stream_loaded = true;
    }
    let offset_arg =
        match (progress.stream_next, config.start) {
            (Some(next), _) => AMQPValue::LongLongInt(i64::try_from(next).map_err(|_| {
                WeirError::internal(format!("stream offset {next} is out of range"))
            })?),
            (None, StreamStart::First) => AMQPValue::LongString("first".into()),
            (None, StreamStart::Last) => AMQPValue::LongString("last".into()),
            (None, StreamStart::Next) => AMQPValue::LongString("next".into()),
            (None, StreamStart::Offset(n)) => AMQPValue::LongLongInt(n as i64), // checked at parse
        };
    let mut consumer = start_consuming(channel, config, Some(offset_arg), status, running).await?;
    loop {
        let batch = next_batch(config, &mut consumer, status).await?;
        let mut next = progress.stream_next;
        let mut messages = Vec::with_capacity(batch.len());
        let mut duplicates = 0;
        let mut too_large = 0;
        for delivery in &batch {
            let Some(offset) = header_value(delivery, HEADER_STREAM_OFFSET).and_then(as_u64) else {
                return Err(wrong_type(config, false));
            };
            if next.is_some_and(|n| offset < n) {
                duplicates += 1; // RabbitMQ starts at the chunk holding the offset asked for
                continue;
            }
            next = Some(offset.saturating_add(1));
            let message = to_message(delivery, Some(offset));
            if !log.fits(&message) {
                too_large += 1;
                continue;
            }
            messages.push(message);
        }
        let appended = messages.len();
        if !messages.is_empty() {
            blocking(log, move |l| l.append(messages))
                .await
                .map_err(append_error)?;
        }
        progress.stream_next = next;
        IngestStatus::add(&status.appended, appended);
        IngestStatus::add(&status.duplicates, duplicates);
        if too_large > 0 {
            IngestStatus::add(&status.rejected, too_large);
            status.set_error(format!(
                "{too_large} message(s) larger than the source's message size limit were skipped"
            ));
        }
        if let Some(last) = batch.last() {
            // Stream acks are credit: they let RabbitMQ send the next messages.
            channel
                .basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .map_err(|e| channel_error(config, "acknowledging on", &e))?;
            IngestStatus::add(&status.acked, batch.len());
        }
    }
}

/// The stream offset of the newest message in the log, if any.
async fn last_stream_offset(log: &Arc<dyn IngestLog>) -> WeirResult<Option<u64>> {
    blocking(log, |l| {
        let end = l.end_offset();
        if end == 0 {
            return Ok(None);
        }
        let Some((offset, message)) = l.read(end - 1, 1)?.pop() else {
            return Ok(None); // retention removed everything
        };
        message.stream_offset().map(Some).ok_or_else(|| {
            WeirError::new(
                SqlState::DATA_CORRUPTED,
                format!(
                    "message {offset} of the source's log has no {HEADER_STREAM_OFFSET} header"
                ),
            )
            .with_hint("a stream source's log holds only messages read from the stream; recreate the source")
        })
    })
    .await
}

/// [`consume`], then the session counts as running.
async fn start_consuming(
    channel: &Channel,
    config: &RabbitMqConfig,
    stream_offset: Option<AMQPValue>,
    status: &IngestStatus,
    running: &mut bool,
) -> WeirResult<Consumer> {
    let consumer = consume(channel, config, stream_offset).await?;
    status.set_state("running");
    *running = true;
    Ok(consumer)
}

/// The next deliveries, counted as received: waits for one, then takes what has already
/// arrived, up to the prefetch. A consumer error or cancellation ends the session (deliveries
/// not acknowledged are requeued by RabbitMQ when the channel goes).
async fn next_batch(
    config: &RabbitMqConfig,
    consumer: &mut Consumer,
    status: &IngestStatus,
) -> WeirResult<Vec<Delivery>> {
    let max = usize::from(config.prefetch);
    let ended = || {
        WeirError::new(
            SqlState::CONNECTION_EXCEPTION,
            format!("RabbitMQ cancelled the consumer of queue \"{}\"", config.queue),
        )
        .with_hint("the queue was probably deleted; the ingest reconnects and declares it again if declare = 'true'")
    };
    let first = match consumer.next().await {
        Some(Ok(delivery)) => delivery,
        Some(Err(e)) => return Err(channel_error(config, "consuming on", &e)),
        None => return Err(ended()),
    };
    let mut batch = vec![first];
    while batch.len() < max {
        match consumer.next().now_or_never() {
            Some(Some(Ok(delivery))) => batch.push(delivery),
            Some(Some(Err(e))) => return Err(channel_error(config, "consuming on", &e)),
            Some(None) => return Err(ended()),
            None => break, // nothing more has arrived: append what we have
        }
    }
    IngestStatus::add(&status.received, batch.len());
    Ok(batch)
}

/// The fingerprints of the messages appended but not known acknowledged (queue mode).
struct Redeliveries {
    counts: HashMap<u64, u32>,
}

impl Redeliveries {
    async fn load(
        log: &Arc<dyn IngestLog>,
        acked_through: Option<u64>,
    ) -> WeirResult<Redeliveries> {
        let counts = blocking(log, move |l| {
            let end = l.end_offset();
            let mut from = acked_through.map_or(0, |o| o.saturating_add(1));
            from = from.max(end.saturating_sub(RECOVERY_FINGERPRINTS_MAX));
            let mut counts: HashMap<u64, u32> = HashMap::new();
            while from < end {
                let page = l.read(from, RECOVERY_PAGE_MESSAGES)?;
                let Some((last, _)) = page.last() else {
                    break;
                };
                from = last.saturating_add(1);
                for (_, message) in &page {
                    *counts.entry(message.fingerprint()).or_default() += 1;
                }
            }
            Ok(counts)
        })
        .await?;
        Ok(Redeliveries { counts })
    }

    /// Whether `message` is a redelivery of an appended one (and so is acknowledged and
    /// skipped). The first delivery that is not a redelivery ends the check.
    fn skip(&mut self, message: &IngestMessage, redelivered: bool) -> bool {
        if self.counts.is_empty() {
            return false;
        }
        if !redelivered {
            self.counts.clear();
            return false;
        }
        let fingerprint = message.fingerprint();
        match self.counts.get_mut(&fingerprint) {
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(&fingerprint);
                }
                true
            }
            None => false,
        }
    }
}

fn header_value<'a>(delivery: &'a Delivery, name: &str) -> Option<&'a AMQPValue> {
    delivery.properties.headers().as_ref()?.inner().get(name)
}

fn as_u64(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::Timestamp(n) => Some(*n),
        _ => None,
    }
}

/// A delivery as the log stores it (see the module docs for the headers).
fn to_message(delivery: &Delivery, stream_offset: Option<u64>) -> IngestMessage {
    let p = &delivery.properties;
    let mut headers: Vec<(String, Bytes)> = Vec::new();
    let mut text = |name: &str, value: String| headers.push((name.to_string(), Bytes::from(value)));
    text("amqp.exchange", delivery.exchange.to_string());
    text("amqp.routing_key", delivery.routing_key.to_string());
    text(HEADER_REDELIVERED, delivery.redelivered.to_string());
    let optional = [
        ("amqp.message_id", p.message_id()),
        ("amqp.correlation_id", p.correlation_id()),
        ("amqp.content_type", p.content_type()),
        ("amqp.type", p.kind()),
        ("amqp.app_id", p.app_id()),
    ];
    for (name, value) in optional {
        if let Some(v) = value {
            text(name, v.to_string());
        }
    }
    if let Some(ts) = p.timestamp() {
        text("amqp.timestamp", ts.to_string());
    }
    if let Some(offset) = stream_offset {
        text(HEADER_STREAM_OFFSET, offset.to_string());
    }
    if let Some(table) = p.headers() {
        for (name, value) in table.inner() {
            if name.as_str() != HEADER_STREAM_OFFSET {
                headers.push((format!("amqp.header.{name}"), value_bytes(value)));
            }
        }
    }
    IngestMessage {
        payload: Bytes::copy_from_slice(&delivery.data),
        headers,
    }
}

/// An AMQP header value as stored: strings as they are, the rest as text.
fn value_bytes(value: &AMQPValue) -> Bytes {
    match value {
        AMQPValue::LongString(s) => Bytes::copy_from_slice(s.as_bytes()),
        AMQPValue::ShortString(s) => Bytes::copy_from_slice(s.as_str().as_bytes()),
        AMQPValue::ByteArray(b) => Bytes::copy_from_slice(b.as_slice()),
        other => Bytes::from(value_json(other).to_string()),
    }
}

fn value_json(value: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(f) => Value::from(*f),
        AMQPValue::Double(f) => Value::from(*f),
        AMQPValue::DecimalValue(d) => {
            let scaled = f64::from(d.value) / 10f64.powi(i32::from(d.scale));
            Value::from(scaled)
        }
        AMQPValue::ShortString(s) => Value::String(s.to_string()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_json).collect()),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), value_json(v)))
                .collect(),
        ),
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::Void => Value::Null,
    }
}

/// An error from an operation on the queue (declare, consume).
fn queue_error(config: &RabbitMqConfig, doing: &str, e: &lapin::Error) -> WeirError {
    let queue = &config.queue;
    match amqp_kind(e) {
        Some((AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND), text)) => missing_queue(config, &text),
        // Classic and quorum queues refuse the stream consumer argument.
        Some((AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED), text))
            if text.contains(HEADER_STREAM_OFFSET) =>
        {
            wrong_type(config, false)
        }
        Some((AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED), text)) => WeirError::new(
            SqlState::INSUFFICIENT_PRIVILEGE,
            format!(
                "RabbitMQ user \"{}\" may not use queue \"{queue}\"",
                config.uri.authority.userinfo.username
            ),
        )
        .with_detail(text)
        .with_hint("grant the user configure, write and read permissions on the queue's vhost"),
        Some((AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED), text)) => WeirError::new(
            SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("queue \"{queue}\" is exclusive to another connection"),
        )
        .with_detail(text)
        .with_hint("use a queue that is not exclusive"),
        Some((_, text)) => WeirError::new(
            SqlState::CONNECTION_EXCEPTION,
            format!("RabbitMQ refused {doing} queue \"{queue}\": {text}"),
        )
        .with_hint("check the queue's settings in RabbitMQ"),
        None => channel_error(config, doing, e),
    }
}

fn missing_queue(config: &RabbitMqConfig, text: &str) -> WeirError {
    WeirError::new(
        SqlState::UNDEFINED_OBJECT,
        format!(
            "RabbitMQ queue \"{}\" does not exist in vhost \"{}\"",
            config.queue, config.uri.vhost
        ),
    )
    .with_detail(text.to_string())
    .with_hint("create the queue or set declare = 'true'")
}

fn wrong_type(config: &RabbitMqConfig, is_stream: bool) -> WeirError {
    let (what, hint) = if is_stream {
        (
            "is a stream queue",
            "use mode = 'stream' to read a stream queue",
        )
    } else {
        (
            "is not a stream queue",
            "use mode = 'queue' (the default) for classic and quorum queues",
        )
    };
    WeirError::new(
        SqlState("42809"),
        format!("RabbitMQ queue \"{}\" {what}", config.queue),
    )
    .with_hint(hint)
}

/// Starts consuming from the queue; a stream consumer gives its start as `stream_offset`.
async fn consume(
    channel: &Channel,
    config: &RabbitMqConfig,
    stream_offset: Option<AMQPValue>,
) -> WeirResult<Consumer> {
    let mut arguments = FieldTable::default();
    if let Some(offset) = stream_offset {
        arguments.insert(HEADER_STREAM_OFFSET.into(), offset);
    }
    channel
        .basic_consume(
            short(&config.queue)?,
            ShortString::from(""),
            BasicConsumeOptions::default(),
            arguments,
        )
        .await
        .map_err(|e| queue_error(config, "consuming from", &e))
}

fn stream_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    arguments
}

/// Declares (or checks) the queue, the exchange and the binding, sets the prefetch, and
/// returns the channel to consume on. A failed AMQP operation closes its channel (and lapin
/// logs that as an error), so the healthy path never provokes one: `declare = 'true'` declares
/// directly, otherwise a passive declare checks the queue exists.
async fn prepare(connection: &Connection, config: &RabbitMqConfig) -> WeirResult<Channel> {
    let queue = short(&config.queue)?;
    let mut channel = open_channel(config, connection).await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    if config.declare {
        let arguments = match config.mode {
            RabbitMqMode::Stream => stream_arguments(),
            RabbitMqMode::Queue => FieldTable::default(),
        };
        match channel
            .queue_declare(queue.clone(), durable, arguments)
            .await
        {
            Ok(_) => {}
            Err(e) if is_soft(&e, AMQPSoftError::PRECONDITIONFAILED) => {
                // The queue exists with other settings. Only its type matters: a stream read
                // as a queue (or the reverse) cannot work; anything else is read as it is.
                let text = e.to_string();
                if text.contains("'x-queue-type'") {
                    match config.mode {
                        RabbitMqMode::Stream => return Err(wrong_type(config, false)),
                        RabbitMqMode::Queue if text.contains("'stream'") => {
                            return Err(wrong_type(config, true));
                        }
                        RabbitMqMode::Queue => {} // a quorum queue
                    }
                }
                channel = open_channel(config, connection).await?;
            }
            Err(e) => return Err(queue_error(config, "declaring", &e)),
        }
    } else {
        // Passive: succeeds without touching the queue; fails (closing the channel) if missing.
        channel
            .queue_declare(queue.clone(), passive, FieldTable::default())
            .await
            .map_err(|e| queue_error(config, "checking", &e))?;
    }
    if let Some(exchange) = &config.exchange {
        let name = short(exchange)?;
        let missing = |text: String| {
            WeirError::new(
                SqlState::UNDEFINED_OBJECT,
                format!(
                    "RabbitMQ exchange \"{exchange}\" does not exist in vhost \"{}\"",
                    config.uri.vhost
                ),
            )
            .with_detail(text)
            .with_hint("create the exchange, or set declare = 'true' to declare it (a durable topic exchange)")
        };
        // A missing exchange is named as such; any other error is reported as the queue's.
        let exchange_error = |doing: &str, e: &lapin::Error| match amqp_kind(e) {
            Some((AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND), text)) => missing(text),
            _ => queue_error(config, doing, e),
        };
        // With declare, a durable topic exchange; without, a passive check that it exists.
        let options = ExchangeDeclareOptions {
            durable: config.declare,
            passive: !config.declare,
            ..ExchangeDeclareOptions::default()
        };
        let declared = channel
            .exchange_declare(
                name.clone(),
                ExchangeKind::Topic,
                options,
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(()) => {}
            // It exists as another type or with other settings: bind to it as it is.
            Err(e) if config.declare && is_soft(&e, AMQPSoftError::PRECONDITIONFAILED) => {
                channel = open_channel(config, connection).await?;
            }
            Err(e) if config.declare => {
                return Err(queue_error(config, "declaring the exchange for", &e));
            }
            Err(e) => return Err(exchange_error("checking the exchange for", &e)),
        }
        channel
            .queue_bind(
                queue.clone(),
                name,
                short(&config.routing_key)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| exchange_error("binding", &e))?;
    }
    // Streams require a prefetch; for queues it bounds the deliveries in flight (and a batch).
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| channel_error(config, "setting the prefetch on", &e))?;
    Ok(channel)
}
