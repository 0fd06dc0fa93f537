//! [`Subscription`]: a named consumer group on a [`Topic`], in one of two modes.
//!
//! - **Stream** (publish/subscribe): the group reads the whole topic in per-partition order.
//!   Partitions are shared out among the group's live consumers; each consumer reads from its
//!   own position and [`Subscription::commit`]s it. After a restart or a reassignment, reading
//!   resumes at the committed offset (at-least-once).
//! - **Queue** (work queue): each message is leased to one consumer at a time; ack removes
//!   it, nack or an expired lease redelivers it, and after `max_deliveries` deliveries it is
//!   published to the dead-letter topic instead.
//!
//! This file owns consumer positions, leases and the subscription's state log. It never writes
//! to the topic it reads (only to the dead-letter topic), never holds its lock across an
//! fsync of its own state log (group commit across callers), and never returns a delivery
//! whose "delivered" event is not durable.
//!
//! # State log
//!
//! `dir` holds a [`Log`] whose records are state events, one JSON object per payload (tag
//! `event`), replayed in order on open:
//!
//! ```text
//! {"event":"start","mode":"stream"|"queue","offsets":[o0,o1,..]}   creation, and seek (stream)
//! {"event":"commit","offsets":[[p,o],..]}          stream: committed offsets of some partitions
//! {"event":"deliver","items":[[p,o,count],..]}     queue: offset o was delivered the count-th time
//! {"event":"ack","items":[[p,o],..]}               queue: acked (or gone to retention): done
//! {"event":"dead_letter","items":[[p,o],..]}       queue: published to the dead-letter topic: done
//! {"event":"snapshot","state":{..}}                the whole state; replaces everything before
//! ```
//!
//! The queue state of a partition is a scan `cursor` (every offset below it was delivered at
//! least once, or skipped by `start`) and the delivery counts of the offsets below the cursor
//! that are not done. Its low watermark (every offset below it acked or dead-lettered) is the
//! smallest such offset, or the cursor. This is the "low watermark + done offsets above it"
//! bookkeeping stored the other way round: the offsets not yet done, which a work queue keeps
//! few of. After every [`SNAPSHOT_EVENTS`] events a snapshot is appended, synced, and the
//! segments before it deleted, so the log stays bounded.
//!
//! Leases themselves are not logged: after a restart every delivered, not-done message is
//! redelivered, its count continuing from the last durable `deliver` event.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::log::{Log, LogConfig, NewRecord, Record};
use super::topic::{Message, QueueError, Topic};

/// Events appended between two snapshots of the state log.
const SNAPSHOT_EVENTS: u64 = 1024;

/// Segment size of a state log: small, so snapshots let old segments go soon.
const STATE_SEGMENT_BYTES_MAX: u64 = 1 << 20;

/// Largest state event (a snapshot of a queue with very many messages in flight).
const STATE_RECORD_BYTES_MAX: u32 = 64 << 20;

/// Items per `deliver`/`ack`/`dead_letter` record; one call may append several records.
const EVENT_ITEMS_MAX: usize = 4096;

/// Most deliveries one [`Subscription::fetch`] returns, whatever `max` asks for.
pub const FETCH_RECORDS_MAX: usize = 10_000;

/// Records read per state-log read during replay.
const REPLAY_READ_RECORDS: usize = 4096;

/// Dead-letter header names.
pub const DEAD_LETTER_REASON: &str = "weir.dead_letter.reason";
pub const DEAD_LETTER_PARTITION: &str = "weir.dead_letter.partition";
pub const DEAD_LETTER_OFFSET: &str = "weir.dead_letter.offset";
pub const DEAD_LETTER_TOPIC: &str = "weir.dead_letter.topic";

/// How a subscription hands out messages; see the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionMode {
    Stream,
    Queue,
}

impl SubscriptionMode {
    fn as_str(self) -> &'static str {
        match self {
            SubscriptionMode::Stream => "stream",
            SubscriptionMode::Queue => "queue",
        }
    }
}

/// Where a new subscription (or a seek) starts, resolved per partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// The oldest retained message.
    Earliest,
    /// The end: only messages published afterwards.
    Latest,
    /// This offset, clamped to the retained range.
    Offset(u64),
    /// The first message with a publish timestamp >= this (ms since the epoch).
    Timestamp(i64),
}

/// A subscription's settings. The engine's catalog persists them; the state log records only
/// the mode (checked on reopen) and the resolved start.
#[derive(Debug, Clone, Copy)]
pub struct SubscriptionConfig {
    pub mode: SubscriptionMode,
    /// Used once, when the subscription is created (nothing in its state log yet).
    pub start: StartPosition,
    /// Queue: how long a lease lasts. Stream: how long a consumer stays live (keeps its
    /// partitions) after its last fetch. At least 1.
    pub ack_timeout_ms: u64,
    /// Queue: deliveries of one message before it is dead-lettered. At least 1.
    pub max_deliveries: u32,
}

impl Default for SubscriptionConfig {
    /// Stream mode from the earliest message, 30 s ack timeout, 5 deliveries.
    fn default() -> Self {
        SubscriptionConfig {
            mode: SubscriptionMode::Stream,
            start: StartPosition::Earliest,
            ack_timeout_ms: 30_000,
            max_deliveries: 5,
        }
    }
}

/// One message handed to a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub partition: u32,
    pub offset: u64,
    pub key: Option<Bytes>,
    pub payload: Bytes,
    pub headers: Vec<(String, Bytes)>,
    /// Publish time, ms since the epoch.
    pub timestamp_ms: i64,
    /// Queue: 1 for the first delivery, counting across restarts. Stream: always 1.
    pub delivery_count: u32,
    /// Queue: the lease to ack or nack. Stream: `None`.
    pub lease_id: Option<String>,
}

/// A snapshot of a subscription's progress, for system tables and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionStats {
    pub mode: SubscriptionMode,
    /// Per partition: end offset minus the committed offset (stream) or the low watermark
    /// (queue).
    pub lag: Vec<u64>,
    /// Queue: leases not yet expired. Stream: messages fetched but not committed by live
    /// consumers.
    pub in_flight: u64,
    /// Queue: deliveries after the first of a message (since creation).
    pub redeliveries: u64,
    /// Queue: messages published to the dead-letter topic (since creation).
    pub dead_lettered: u64,
}

/// A consumer group on a topic. `Send + Sync`; share it as `Arc<Subscription>`. Every method
/// blocks on disk I/O; async callers wrap them in `spawn_blocking` (or, for waiting, use
/// [`Topic::wait_for_messages`] through [`Subscription::topic`]).
pub struct Subscription {
    topic: Arc<Topic>,
    dead_letter: Option<Arc<Topic>>,
    config: SubscriptionConfig,
    /// The state events (see the module doc). Appended under `state`, synced outside it.
    log: Log,
    /// All in-memory state. Held while reading the topic, publishing dead letters and
    /// appending state events (so event order = order of the changes), never across the
    /// fsync of `log`.
    state: Mutex<State>,
}

struct State {
    mode: ModeState,
    /// Events appended since the last snapshot.
    events_since_snapshot: u64,
}

enum ModeState {
    Stream(StreamState),
    Queue(QueueState),
}

struct StreamState {
    /// Durable committed offset per partition.
    committed: Vec<u64>,
    /// Consumers seen within `ack_timeout_ms` (pruned on fetch), by id (sorted: that order
    /// is the assignment order).
    consumers: BTreeMap<String, Consumer>,
    /// The consumer that currently owns each partition, if assigned.
    owners: Vec<Option<String>>,
}

struct Consumer {
    last_fetch_ms: i64,
    /// Next offset to read, for each partition this consumer owns.
    positions: BTreeMap<u32, u64>,
}

#[derive(Default)]
struct QueueState {
    partitions: Vec<QueuePartition>,
    /// Lease id → (partition, offset) for every lease not yet acked, nacked or swept.
    leases: HashMap<String, (u32, u64)>,
    /// (expires_at_ms, partition, offset) of every entry in `leases`.
    expiry: BTreeSet<(i64, u32, u64)>,
    /// Messages due for the dead-letter topic, with the reason; retried until published.
    dead_due: BTreeMap<(u32, u64), String>,
    dead_lettered: u64,
    redeliveries: u64,
    /// Partition where the next scan for new messages begins (rotates for fairness).
    next_partition: u32,
}

#[derive(Default)]
struct QueuePartition {
    /// Every offset below was delivered at least once (or skipped).
    cursor: u64,
    /// Delivery count of each offset below `cursor` that is not done. Each key is in exactly
    /// one of `leased`, `pending` or `QueueState::dead_due`.
    counts: BTreeMap<u64, u32>,
    leased: HashMap<u64, Lease>,
    /// Waiting for redelivery.
    pending: BTreeSet<u64>,
}

struct Lease {
    id: String,
    expires_at_ms: i64,
}

impl QueuePartition {
    fn low_watermark(&self) -> u64 {
        self.counts.keys().next().copied().unwrap_or(self.cursor)
    }
}

/// A state event; see the module doc for the JSON.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event {
    Start { mode: String, offsets: Vec<u64> },
    Commit { offsets: Vec<(u32, u64)> },
    Deliver { items: Vec<(u32, u64, u32)> },
    Ack { items: Vec<(u32, u64)> },
    DeadLetter { items: Vec<(u32, u64)> },
    Snapshot { state: Snapshot },
}

#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    mode: String,
    /// Stream: committed offsets. Queue: empty.
    committed: Vec<u64>,
    /// Queue: per partition. Stream: empty.
    partitions: Vec<PartitionSnapshot>,
    dead_lettered: u64,
    redeliveries: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct PartitionSnapshot {
    cursor: u64,
    counts: Vec<(u64, u32)>,
}

/// Where an [`Subscription::append_events`] batch ended, and its snapshot record if any.
struct Appended {
    end: u64,
    snapshot: Option<u64>,
}

/// Events of one operation, appended as one batch.
#[derive(Default)]
struct Events {
    deliver: Vec<(u32, u64, u32)>,
    ack: Vec<(u32, u64)>,
    dead_letter: Vec<(u32, u64)>,
    other: Vec<Event>,
}

impl Events {
    fn into_events(self) -> Vec<Event> {
        let mut events = self.other;
        for chunk in self.dead_letter.chunks(EVENT_ITEMS_MAX) {
            events.push(Event::DeadLetter {
                items: chunk.to_vec(),
            });
        }
        for chunk in self.deliver.chunks(EVENT_ITEMS_MAX) {
            events.push(Event::Deliver {
                items: chunk.to_vec(),
            });
        }
        for chunk in self.ack.chunks(EVENT_ITEMS_MAX) {
            events.push(Event::Ack {
                items: chunk.to_vec(),
            });
        }
        events
    }
}

impl Subscription {
    /// Opens the subscription whose state lives in `dir` (creating it), replaying its state
    /// log. A new subscription resolves `config.start` against the topic now and records it
    /// durably. `dead_letter` receives queue-mode messages that ran out of deliveries, with
    /// the `weir.dead_letter.*` headers added (reason, partition, offset, source topic name);
    /// without one they are dropped (and counted as dead-lettered).
    ///
    /// Fails with [`QueueError::InvalidConfig`] for a zero `ack_timeout_ms` or
    /// `max_deliveries`, or a mode different from the one `dir` was created with; with
    /// [`QueueError::Corrupt`] for an event that does not parse or fit the topic; with
    /// [`QueueError::Log`] if the state log cannot be opened (also when another
    /// `Subscription` has `dir` open).
    pub fn open(
        dir: &Path,
        topic: Arc<Topic>,
        config: SubscriptionConfig,
        dead_letter: Option<Arc<Topic>>,
    ) -> Result<Subscription, QueueError> {
        if config.ack_timeout_ms == 0 || config.max_deliveries == 0 {
            return Err(QueueError::InvalidConfig(
                "ack_timeout_ms and max_deliveries must be at least 1".to_string(),
            ));
        }
        let log = Log::open(
            dir,
            LogConfig {
                segment_bytes_max: STATE_SEGMENT_BYTES_MAX,
                record_bytes_max: STATE_RECORD_BYTES_MAX,
            },
        )?;
        let partitions = topic.partitions();
        let mut replay = Replay::new(config.mode, partitions);
        let mut from = log.start_offset();
        loop {
            let records = log.read(from, REPLAY_READ_RECORDS, usize::MAX)?;
            let Some(last) = records.last() else { break };
            from = last.offset + 1;
            for record in &records {
                let event: Event = serde_json::from_slice(&record.payload).map_err(|e| {
                    QueueError::Corrupt(format!(
                        "subscription state event {} in {}: {e}",
                        record.offset,
                        dir.display()
                    ))
                })?;
                replay.apply(event).map_err(|reason| {
                    QueueError::Corrupt(format!(
                        "subscription state event {} in {}: {reason}",
                        record.offset,
                        dir.display()
                    ))
                })?;
            }
        }
        if let Some(mode) = &replay.mismatched_mode {
            return Err(QueueError::InvalidConfig(format!(
                "subscription state in {} was created in {mode} mode, not {}",
                dir.display(),
                config.mode.as_str()
            )));
        }
        let started = replay.started;
        let subscription = Subscription {
            state: Mutex::new(State {
                mode: replay.into_state(&topic, config.max_deliveries),
                events_since_snapshot: 0,
            }),
            topic,
            dead_letter,
            config,
            log,
        };
        if !started {
            let offsets = subscription.resolve(config.start)?;
            let mut state = subscription.lock_state();
            set_start(&mut state.mode, &offsets);
            let event = Event::Start {
                mode: config.mode.as_str().to_string(),
                offsets,
            };
            subscription.log.append_durable(&[encode(&event)?])?;
        }
        Ok(subscription)
    }

    /// The configuration given to [`Subscription::open`].
    pub fn config(&self) -> SubscriptionConfig {
        self.config
    }

    /// The topic read from; use its [`Topic::wait_for_messages`] to wait for new messages.
    pub fn topic(&self) -> &Arc<Topic> {
        &self.topic
    }

    /// Fetches up to `max` (at most [`FETCH_RECORDS_MAX`]) messages for `consumer`, an opaque
    /// id (one per client session or HTTP caller); `now_ms` is the wall clock. Returns at once
    /// with what is there (possibly nothing). `max = 0` only registers the consumer as live.
    ///
    /// Stream: the consumer becomes live (until `ack_timeout_ms` after this fetch). Partition
    /// `p` belongs to `live[p % live.len()]` of the sorted live consumer ids; a partition that
    /// changes owner restarts at the committed offset (at-least-once). Reads the consumer's
    /// partitions from its positions; deliveries are in offset order per partition, with the
    /// partitions interleaved.
    ///
    /// Queue: first sweeps expired leases, dead-letters messages out of deliveries, then
    /// redelivers nacked/expired messages, then new messages (partitions in rotating order).
    /// Each delivery gets a fresh lease `"<partition>-<offset>-<delivery_count>"` expiring at
    /// `now_ms + ack_timeout_ms`. The deliveries are recorded durably before this returns. A
    /// message is leased to at most one consumer at a time.
    pub fn fetch(
        &self,
        consumer: &str,
        max: usize,
        now_ms: i64,
    ) -> Result<Vec<Delivery>, QueueError> {
        let max = max.min(FETCH_RECORDS_MAX);
        let mut guard = self.lock_state();
        let state = &mut *guard;
        match &mut state.mode {
            ModeState::Stream(stream) => self.fetch_stream(stream, consumer, max, now_ms),
            ModeState::Queue(queue) => {
                let mut events = Events::default();
                let result = self.fetch_queue(queue, max, now_ms, &mut events);
                // Dead letters published before an error must still be recorded.
                let end = self.append_events(state, events)?;
                drop(guard);
                self.sync(end)?;
                result
            }
        }
    }

    /// Queue mode: acks `lease_ids` (duplicates count once); durable when it returns, and the
    /// acked messages are never delivered again. All or nothing: if any lease is unknown
    /// ([`QueueError::UnknownLease`]) or expired ([`QueueError::LeaseExpired`]), nothing is
    /// acked and the error names the first such lease. Returns the number acked.
    pub fn ack(&self, lease_ids: &[String], now_ms: i64) -> Result<usize, QueueError> {
        let mut guard = self.lock_state();
        let state = &mut *guard;
        let ModeState::Queue(queue) = &mut state.mode else {
            return Err(wrong_mode("ack", SubscriptionMode::Queue));
        };
        let targets = queue.live_leases(lease_ids, now_ms)?;
        let mut events = Events::default();
        for &(p, o) in &targets {
            queue.release(p, o);
            queue.partitions[p as usize].counts.remove(&o);
            events.ack.push((p, o));
        }
        let end = self.append_events(state, events)?;
        drop(guard);
        self.sync(end)?;
        Ok(targets.len())
    }

    /// Queue mode: gives `lease_ids` back for immediate redelivery (to any consumer), or, for
    /// a message already delivered `max_deliveries` times, publishes it to the dead-letter
    /// topic with reason `"nacked <n> times"` (recorded durably before returning). Same
    /// all-or-nothing validation and errors as [`Subscription::ack`]. Returns the number
    /// nacked.
    pub fn nack(&self, lease_ids: &[String], now_ms: i64) -> Result<usize, QueueError> {
        let mut guard = self.lock_state();
        let state = &mut *guard;
        let ModeState::Queue(queue) = &mut state.mode else {
            return Err(wrong_mode("nack", SubscriptionMode::Queue));
        };
        let targets = queue.live_leases(lease_ids, now_ms)?;
        for &(p, o) in &targets {
            queue.release(p, o);
            queue.requeue(p, o, self.config.max_deliveries, "nacked");
        }
        let mut events = Events::default();
        let result = self.dead_letter_due(queue, &mut events);
        let end = self.append_events(state, events)?;
        drop(guard);
        self.sync(end)?;
        result.map(|()| targets.len())
    }

    /// Stream mode: commits the positions of the partitions `consumer` owns (everything it
    /// was handed by `fetch`), durable when it returns. Returns the committed
    /// `(partition, offset)` pairs; empty for a consumer that owns nothing (unknown, or no
    /// longer live and reassigned).
    pub fn commit(&self, consumer: &str) -> Result<Vec<(u32, u64)>, QueueError> {
        let mut guard = self.lock_state();
        let state = &mut *guard;
        let ModeState::Stream(stream) = &mut state.mode else {
            return Err(wrong_mode("commit", SubscriptionMode::Stream));
        };
        let Some(c) = stream.consumers.get(consumer) else {
            return Ok(Vec::new());
        };
        let offsets: Vec<(u32, u64)> = c.positions.iter().map(|(&p, &o)| (p, o)).collect();
        if offsets.is_empty() {
            return Ok(offsets);
        }
        for &(p, o) in &offsets {
            stream.committed[p as usize] = o;
        }
        let events = Events {
            other: vec![Event::Commit {
                offsets: offsets.clone(),
            }],
            ..Events::default()
        };
        let end = self.append_events(state, events)?;
        drop(guard);
        self.sync(end)?;
        Ok(offsets)
    }

    /// Stream mode: moves the committed offset of every partition, and every consumer's
    /// position, to `to` (resolved per partition as in [`StartPosition`]). Durable when it
    /// returns.
    pub fn seek(&self, to: StartPosition) -> Result<(), QueueError> {
        if self.config.mode != SubscriptionMode::Stream {
            return Err(wrong_mode("seek", SubscriptionMode::Stream));
        }
        let offsets = self.resolve(to)?;
        let mut guard = self.lock_state();
        let state = &mut *guard;
        set_start(&mut state.mode, &offsets);
        let events = Events {
            other: vec![Event::Start {
                mode: self.config.mode.as_str().to_string(),
                offsets,
            }],
            ..Events::default()
        };
        let end = self.append_events(state, events)?;
        drop(guard);
        self.sync(end)?;
        Ok(())
    }

    /// Progress at `now_ms`; see [`SubscriptionStats`].
    pub fn stats(&self, now_ms: i64) -> SubscriptionStats {
        let state = self.lock_state();
        let n = self.topic.partitions();
        match &state.mode {
            ModeState::Stream(stream) => {
                let lag = (0..n)
                    .map(|p| {
                        self.topic
                            .end_offset(p)
                            .saturating_sub(stream.committed[p as usize])
                    })
                    .collect();
                let in_flight = stream
                    .consumers
                    .values()
                    .filter(|c| self.is_live(c, now_ms))
                    .flat_map(|c| c.positions.iter())
                    .map(|(&p, &o)| o.saturating_sub(stream.committed[p as usize]))
                    .sum();
                SubscriptionStats {
                    mode: SubscriptionMode::Stream,
                    lag,
                    in_flight,
                    redeliveries: 0,
                    dead_lettered: 0,
                }
            }
            ModeState::Queue(queue) => SubscriptionStats {
                mode: SubscriptionMode::Queue,
                lag: (0..n)
                    .map(|p| {
                        self.topic
                            .end_offset(p)
                            .saturating_sub(queue.partitions[p as usize].low_watermark())
                    })
                    .collect(),
                in_flight: queue.expiry.iter().filter(|e| e.0 > now_ms).count() as u64,
                redeliveries: queue.redeliveries,
                dead_lettered: queue.dead_lettered,
            },
        }
    }

    fn is_live(&self, consumer: &Consumer, now_ms: i64) -> bool {
        let timeout = i64::try_from(self.config.ack_timeout_ms).unwrap_or(i64::MAX);
        now_ms.saturating_sub(consumer.last_fetch_ms) < timeout
    }

    fn fetch_stream(
        &self,
        stream: &mut StreamState,
        consumer: &str,
        max: usize,
        now_ms: i64,
    ) -> Result<Vec<Delivery>, QueueError> {
        stream
            .consumers
            .entry(consumer.to_string())
            .or_insert_with(|| Consumer {
                last_fetch_ms: now_ms,
                positions: BTreeMap::new(),
            })
            .last_fetch_ms = now_ms;
        stream.consumers.retain(|_, c| self.is_live(c, now_ms));
        let live: Vec<String> = stream.consumers.keys().cloned().collect();
        for p in 0..stream.owners.len() {
            let owner = &live[p % live.len()];
            if stream.owners[p].as_ref() == Some(owner) {
                continue;
            }
            if let Some(old) = stream.owners[p].take()
                && let Some(c) = stream.consumers.get_mut(&old)
            {
                c.positions.remove(&(p as u32));
            }
            let committed = stream.committed[p];
            if let Some(c) = stream.consumers.get_mut(owner) {
                c.positions.insert(p as u32, committed);
            }
            stream.owners[p] = Some(owner.clone());
        }
        let c = stream
            .consumers
            .get_mut(consumer)
            .expect("the caller was just marked live");
        if max == 0 || c.positions.is_empty() {
            return Ok(Vec::new());
        }
        let share = max.div_ceil(c.positions.len());
        let mut per_partition = Vec::with_capacity(c.positions.len());
        let mut remaining = max;
        for (&p, position) in c.positions.iter_mut() {
            if remaining == 0 {
                break;
            }
            let records = self.topic.read(p, *position, share.min(remaining))?;
            if let Some(last) = records.last() {
                *position = last.offset + 1;
            }
            remaining -= records.len();
            per_partition.push((p, records.into_iter()));
        }
        let mut deliveries = Vec::with_capacity(max - remaining);
        loop {
            let before = deliveries.len();
            for (p, records) in &mut per_partition {
                if let Some(record) = records.next() {
                    deliveries.push(delivery(*p, record, 1, None));
                }
            }
            if deliveries.len() == before {
                return Ok(deliveries);
            }
        }
    }

    fn fetch_queue(
        &self,
        queue: &mut QueueState,
        max: usize,
        now_ms: i64,
        events: &mut Events,
    ) -> Result<Vec<Delivery>, QueueError> {
        queue.sweep_expired(now_ms, self.config.max_deliveries);
        self.dead_letter_due(queue, events)?;
        let expires_at_ms =
            now_ms.saturating_add(i64::try_from(self.config.ack_timeout_ms).unwrap_or(i64::MAX));
        let mut deliveries = Vec::new();
        // Redeliveries first, oldest offsets of each partition first.
        let pending: Vec<(u32, u64)> = queue
            .partitions
            .iter()
            .enumerate()
            .flat_map(|(p, part)| part.pending.iter().map(move |&o| (p as u32, o)))
            .take(max)
            .collect();
        for (p, o) in pending {
            let part = &mut queue.partitions[p as usize];
            part.pending.remove(&o);
            let record = self.topic.read(p, o, 1)?.into_iter().next();
            let Some(record) = record.filter(|r| r.offset == o) else {
                // Retention deleted it before it was acked: nothing left to deliver.
                tracing::warn!(
                    partition = p,
                    offset = o,
                    "unacked message lost to retention"
                );
                part.counts.remove(&o);
                events.ack.push((p, o));
                continue;
            };
            let count = part.counts.get(&o).copied().unwrap_or(0) + 1;
            queue.redeliveries += 1;
            let lease_id = queue.lease(p, o, count, expires_at_ms);
            events.deliver.push((p, o, count));
            deliveries.push(delivery(p, record, count, Some(lease_id)));
        }
        // New messages, fairly from every partition in rotating order.
        let n = queue.partitions.len() as u32;
        let first = queue.next_partition % n;
        queue.next_partition = (first + 1) % n;
        loop {
            let remaining = max - deliveries.len();
            if remaining == 0 {
                break;
            }
            let share = remaining.div_ceil(n as usize);
            let before = deliveries.len();
            for i in 0..n {
                let p = (first + i) % n;
                let remaining = max - deliveries.len();
                if remaining == 0 {
                    break;
                }
                let cursor = queue.partitions[p as usize].cursor;
                for record in self.topic.read(p, cursor, share.min(remaining))? {
                    let o = record.offset;
                    let part = &mut queue.partitions[p as usize];
                    part.cursor = o + 1;
                    part.counts.insert(o, 1);
                    let lease_id = queue.lease(p, o, 1, expires_at_ms);
                    events.deliver.push((p, o, 1));
                    deliveries.push(delivery(p, record, 1, Some(lease_id)));
                }
            }
            if deliveries.len() == before {
                break;
            }
        }
        Ok(deliveries)
    }

    /// Publishes every message in `queue.dead_due` to the dead-letter topic (durably), then
    /// marks them done and adds their events. On error the messages stay due.
    fn dead_letter_due(
        &self,
        queue: &mut QueueState,
        events: &mut Events,
    ) -> Result<(), QueueError> {
        if queue.dead_due.is_empty() {
            return Ok(());
        }
        let mut messages = Vec::new();
        let mut done = Vec::new();
        for (&(p, o), reason) in &queue.dead_due {
            let record = self.topic.read(p, o, 1)?.into_iter().next();
            let Some(record) = record.filter(|r| r.offset == o) else {
                tracing::warn!(partition = p, offset = o, "dead letter lost to retention");
                done.push((p, o, false));
                continue;
            };
            let mut headers = record.headers;
            headers.push((DEAD_LETTER_REASON.to_string(), Bytes::from(reason.clone())));
            headers.push((
                DEAD_LETTER_PARTITION.to_string(),
                Bytes::from(p.to_string()),
            ));
            headers.push((DEAD_LETTER_OFFSET.to_string(), Bytes::from(o.to_string())));
            headers.push((
                DEAD_LETTER_TOPIC.to_string(),
                Bytes::from(self.topic.name().to_string()),
            ));
            messages.push(Message {
                key: record.key,
                payload: record.payload,
                headers,
            });
            done.push((p, o, true));
        }
        match &self.dead_letter {
            Some(topic) => {
                topic.publish_unchecked(&messages)?;
            }
            None if !messages.is_empty() => {
                tracing::warn!(
                    messages = messages.len(),
                    "no dead-letter topic: dropping messages out of deliveries"
                );
            }
            None => {}
        }
        for (p, o, dead) in done {
            queue.dead_due.remove(&(p, o));
            queue.partitions[p as usize].counts.remove(&o);
            if dead {
                queue.dead_lettered += 1;
                events.dead_letter.push((p, o));
            } else {
                events.ack.push((p, o));
            }
        }
        Ok(())
    }

    /// Appends `events` (and a snapshot when due) under the state lock, without fsync.
    /// Returns what to pass to [`Subscription::sync`], or `None` if nothing was appended.
    fn append_events(
        &self,
        state: &mut State,
        events: Events,
    ) -> Result<Option<Appended>, QueueError> {
        let events = events.into_events();
        if events.is_empty() {
            return Ok(None);
        }
        let mut records = events.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
        state.events_since_snapshot += records.len() as u64;
        let snapshot = state.events_since_snapshot >= SNAPSHOT_EVENTS;
        if snapshot {
            records.push(encode(&Event::Snapshot {
                state: snapshot_of(&state.mode, self.config.mode),
            })?);
            state.events_since_snapshot = 0;
        }
        let range = self.log.append(&records)?;
        Ok(Some(Appended {
            end: range.end,
            snapshot: snapshot.then(|| range.end - 1),
        }))
    }

    /// Makes the state log durable up to what was appended, then, if that included a
    /// snapshot, deletes the segments wholly before it (only once the snapshot is durable).
    fn sync(&self, appended: Option<Appended>) -> Result<(), QueueError> {
        let Some(appended) = appended else {
            return Ok(());
        };
        self.log.sync_to(appended.end)?;
        if let Some(offset) = appended.snapshot {
            self.log.truncate_before(offset)?;
        }
        Ok(())
    }

    /// Resolves `start` to an offset per partition of the topic.
    fn resolve(&self, start: StartPosition) -> Result<Vec<u64>, QueueError> {
        (0..self.topic.partitions())
            .map(|p| {
                let (first, end) = (self.topic.start_offset(p), self.topic.end_offset(p));
                Ok(match start {
                    StartPosition::Earliest => first,
                    StartPosition::Latest => end,
                    StartPosition::Offset(o) => o.clamp(first, end.max(first)),
                    StartPosition::Timestamp(ts) => self.topic.offset_for_timestamp(p, ts)?,
                })
            })
            .collect()
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // The state is only changed in ways that keep its invariants between statements that
        // cannot panic short of a bug; after one, the process is not worth keeping alive.
        self.state
            .lock()
            .expect("subscription state poisoned: a holder panicked")
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic.name())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl QueueState {
    /// Moves every lease expired at `now_ms` to redelivery, or to the dead-letter queue if its
    /// message has had `max_deliveries`.
    fn sweep_expired(&mut self, now_ms: i64, max_deliveries: u32) {
        while let Some(&(expires_at_ms, p, o)) = self.expiry.first() {
            if expires_at_ms > now_ms {
                break;
            }
            self.release(p, o);
            self.requeue(p, o, max_deliveries, "lease expired");
        }
    }

    /// Removes the lease on (p, o), if any.
    fn release(&mut self, p: u32, o: u64) {
        if let Some(lease) = self.partitions[p as usize].leased.remove(&o) {
            self.leases.remove(&lease.id);
            self.expiry.remove(&(lease.expires_at_ms, p, o));
        }
    }

    /// Queues (p, o), not leased, for redelivery, or for the dead-letter topic once it has
    /// been delivered `max_deliveries` times (`why` = "nacked" or "lease expired").
    fn requeue(&mut self, p: u32, o: u64, max_deliveries: u32, why: &str) {
        let part = &mut self.partitions[p as usize];
        let Some(&count) = part.counts.get(&o) else {
            return;
        };
        if count >= max_deliveries {
            self.dead_due.insert((p, o), format!("{why} {count} times"));
        } else {
            part.pending.insert(o);
        }
    }

    /// Leases (p, o) for its `count`-th delivery; returns the lease id.
    fn lease(&mut self, p: u32, o: u64, count: u32, expires_at_ms: i64) -> String {
        let id = format!("{p}-{o}-{count}");
        let part = &mut self.partitions[p as usize];
        part.counts.insert(o, count);
        part.leased.insert(
            o,
            Lease {
                id: id.clone(),
                expires_at_ms,
            },
        );
        self.leases.insert(id.clone(), (p, o));
        self.expiry.insert((expires_at_ms, p, o));
        id
    }

    /// The (partition, offset) of each lease id, deduplicated, if all are live at `now_ms`.
    fn live_leases(
        &self,
        lease_ids: &[String],
        now_ms: i64,
    ) -> Result<Vec<(u32, u64)>, QueueError> {
        let mut seen = HashSet::new();
        let mut targets = Vec::new();
        for id in lease_ids {
            if !seen.insert(id.as_str()) {
                continue;
            }
            match self.leases.get(id) {
                Some(&(p, o)) => {
                    let expired = self.partitions[p as usize]
                        .leased
                        .get(&o)
                        .is_none_or(|lease| lease.expires_at_ms <= now_ms);
                    if expired {
                        return Err(QueueError::LeaseExpired {
                            lease_id: id.clone(),
                        });
                    }
                    targets.push((p, o));
                }
                None if self.superseded(id) => {
                    return Err(QueueError::LeaseExpired {
                        lease_id: id.clone(),
                    });
                }
                None => {
                    return Err(QueueError::UnknownLease {
                        lease_id: id.clone(),
                    });
                }
            }
        }
        Ok(targets)
    }

    /// Whether `id` is a lease this subscription issued (possibly before a restart) whose
    /// message is not done yet: it expired and was or will be redelivered.
    fn superseded(&self, id: &str) -> bool {
        let mut parts = id.splitn(3, '-');
        let (Some(p), Some(o), Some(count)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        let (Ok(p), Ok(o), Ok(count)) =
            (p.parse::<usize>(), o.parse::<u64>(), count.parse::<u32>())
        else {
            return false;
        };
        self.partitions
            .get(p)
            .and_then(|part| part.counts.get(&o))
            .is_some_and(|&recorded| count >= 1 && count <= recorded)
    }
}

/// State rebuilt from the state log.
struct Replay {
    mode: SubscriptionMode,
    partitions: u32,
    started: bool,
    /// Set when an event was written in the other mode.
    mismatched_mode: Option<String>,
    committed: Vec<u64>,
    queue: Vec<QueuePartition>,
    dead_lettered: u64,
    redeliveries: u64,
}

impl Replay {
    fn new(mode: SubscriptionMode, partitions: u32) -> Replay {
        Replay {
            mode,
            partitions,
            started: false,
            mismatched_mode: None,
            committed: vec![0; partitions as usize],
            queue: (0..partitions).map(|_| QueuePartition::default()).collect(),
            dead_lettered: 0,
            redeliveries: 0,
        }
    }

    fn check_mode(&mut self, mode: &str) {
        if mode != self.mode.as_str() && self.mismatched_mode.is_none() {
            self.mismatched_mode = Some(mode.to_string());
        }
    }

    fn partition(&self, p: u32) -> Result<usize, String> {
        if p < self.partitions {
            Ok(p as usize)
        } else {
            Err(format!(
                "partition {p} is beyond the topic's {} partitions",
                self.partitions
            ))
        }
    }

    fn check_len(&self, len: usize) -> Result<(), String> {
        if len == self.partitions as usize {
            Ok(())
        } else {
            Err(format!(
                "{len} partitions recorded, but the topic has {}",
                self.partitions
            ))
        }
    }

    fn apply(&mut self, event: Event) -> Result<(), String> {
        match event {
            Event::Start { mode, offsets } => {
                self.check_mode(&mode);
                self.check_len(offsets.len())?;
                self.started = true;
                for (p, &o) in offsets.iter().enumerate() {
                    self.committed[p] = o;
                    self.queue[p] = QueuePartition {
                        cursor: o,
                        ..QueuePartition::default()
                    };
                }
            }
            Event::Commit { offsets } => {
                for (p, o) in offsets {
                    let p = self.partition(p)?;
                    self.committed[p] = o;
                }
            }
            Event::Deliver { items } => {
                for (p, o, count) in items {
                    let p = self.partition(p)?;
                    let part = &mut self.queue[p];
                    part.counts.insert(o, count);
                    part.cursor = part.cursor.max(o + 1);
                    if count > 1 {
                        self.redeliveries += 1;
                    }
                }
            }
            Event::Ack { items } => {
                for (p, o) in items {
                    let p = self.partition(p)?;
                    self.queue[p].counts.remove(&o);
                }
            }
            Event::DeadLetter { items } => {
                for (p, o) in items {
                    let p = self.partition(p)?;
                    self.queue[p].counts.remove(&o);
                    self.dead_lettered += 1;
                }
            }
            Event::Snapshot { state } => {
                self.check_mode(&state.mode);
                self.started = true;
                self.dead_lettered = state.dead_lettered;
                self.redeliveries = state.redeliveries;
                match self.mode {
                    SubscriptionMode::Stream => {
                        self.check_len(state.committed.len())?;
                        self.committed = state.committed;
                    }
                    SubscriptionMode::Queue => {
                        self.check_len(state.partitions.len())?;
                        self.queue = state
                            .partitions
                            .into_iter()
                            .map(|s| QueuePartition {
                                cursor: s.cursor,
                                counts: s.counts.into_iter().collect(),
                                ..QueuePartition::default()
                            })
                            .collect();
                    }
                }
            }
        }
        Ok(())
    }

    fn into_state(self, topic: &Topic, max_deliveries: u32) -> ModeState {
        match self.mode {
            SubscriptionMode::Stream => ModeState::Stream(StreamState {
                committed: self.committed,
                consumers: BTreeMap::new(),
                owners: vec![None; self.partitions as usize],
            }),
            SubscriptionMode::Queue => {
                let mut queue = QueueState {
                    partitions: self.queue,
                    dead_lettered: self.dead_lettered,
                    redeliveries: self.redeliveries,
                    ..QueueState::default()
                };
                for p in 0..self.partitions {
                    let part = &mut queue.partitions[p as usize];
                    // Retention may have moved the topic's start past the cursor.
                    part.cursor = part.cursor.max(topic.start_offset(p));
                    // Leases do not survive a restart: every delivered, unfinished message
                    // is redelivered (or dead-lettered if it is out of deliveries).
                    let offsets: Vec<u64> = part.counts.keys().copied().collect();
                    for o in offsets {
                        queue.requeue(p, o, max_deliveries, "lease expired");
                    }
                }
                ModeState::Queue(queue)
            }
        }
    }
}

/// Sets committed offsets (stream) or cursors (queue) to `offsets`, forgetting positions and
/// in-flight state.
fn set_start(mode: &mut ModeState, offsets: &[u64]) {
    match mode {
        ModeState::Stream(stream) => {
            stream.committed = offsets.to_vec();
            for c in stream.consumers.values_mut() {
                for (&p, position) in c.positions.iter_mut() {
                    *position = offsets[p as usize];
                }
            }
        }
        ModeState::Queue(queue) => {
            *queue = QueueState {
                partitions: offsets
                    .iter()
                    .map(|&o| QueuePartition {
                        cursor: o,
                        ..QueuePartition::default()
                    })
                    .collect(),
                dead_lettered: queue.dead_lettered,
                redeliveries: queue.redeliveries,
                ..QueueState::default()
            };
        }
    }
}

fn snapshot_of(mode: &ModeState, subscription_mode: SubscriptionMode) -> Snapshot {
    match mode {
        ModeState::Stream(stream) => Snapshot {
            mode: subscription_mode.as_str().to_string(),
            committed: stream.committed.clone(),
            partitions: Vec::new(),
            dead_lettered: 0,
            redeliveries: 0,
        },
        ModeState::Queue(queue) => Snapshot {
            mode: subscription_mode.as_str().to_string(),
            committed: Vec::new(),
            partitions: queue
                .partitions
                .iter()
                .map(|part| PartitionSnapshot {
                    cursor: part.cursor,
                    counts: part.counts.iter().map(|(&o, &c)| (o, c)).collect(),
                })
                .collect(),
            dead_lettered: queue.dead_lettered,
            redeliveries: queue.redeliveries,
        },
    }
}

fn encode(event: &Event) -> Result<NewRecord, QueueError> {
    let payload = serde_json::to_vec(event)
        .map_err(|e| QueueError::Corrupt(format!("cannot encode a state event: {e}")))?;
    Ok(NewRecord {
        timestamp_ms: super::topic::now_ms(),
        key: None,
        headers: Vec::new(),
        payload: Bytes::from(payload),
    })
}

fn delivery(
    partition: u32,
    record: Record,
    delivery_count: u32,
    lease_id: Option<String>,
) -> Delivery {
    Delivery {
        partition,
        offset: record.offset,
        key: record.key,
        payload: record.payload,
        headers: record.headers,
        timestamp_ms: record.timestamp_ms,
        delivery_count,
        lease_id,
    }
}

fn wrong_mode(operation: &'static str, expected: SubscriptionMode) -> QueueError {
    QueueError::WrongMode {
        operation,
        expected: expected.as_str(),
    }
}
