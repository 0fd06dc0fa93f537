//! The built-in queue's storage: one durable, segmented, checksummed, append-only log per
//! stored stream (a topic partition, an append-only table or a source all sit on a [`Log`]).
//!
//! This module owns bytes on disk, offsets and durability. It never interprets payloads, never
//! decides retention policy or consumer positions, and never imports anything of Weir but
//! `crate::types`. All of its operations block on disk I/O; async callers wrap them in
//! `tokio::task::spawn_blocking`.
//!
//! - `log.rs`: [`Log`] itself: appends with dense offsets, group commit ([`Log::sync_to`]: one
//!   fsync serves every caller waiting behind it, without blocking appenders), torn-tail
//!   recovery on open, reads by offset, retention by whole segments.
//! - `topic.rs`: [`Topic`]: partitions (one log each), routing by key, durable publish,
//!   retention policy, waiting for new messages; [`QueueError`].
//! - `subscription.rs`: [`Subscription`]: consumer groups in stream mode (committed offsets,
//!   partitions shared among live consumers) or queue mode (leases, ack/nack, redelivery,
//!   dead letters), with their own state log.
//! - `segment.rs`: one segment file: the frame format (documented there), checksums, recovery
//!   scan and the sparse offset index.
//!
//! Durability contract: a record is *acknowledged* once [`Log::append_durable`] (or a
//! [`Log::sync_to`] covering it) has returned, and then survives any crash. A record that was
//! appended but not yet synced may or may not survive; if several of one batch survive, they
//! are a prefix of it. Corruption that cannot be a torn tail stops [`Log::open`] with
//! [`LogError::Corrupt`] rather than dropping data.
//!
//! Unix only: reads and writes use positional I/O (`FileExt`) so readers never share a
//! file cursor with the writer.

mod log;
mod segment;
pub mod subscription;
pub mod topic;

pub use self::log::{Log, LogConfig, LogError, NewRecord, Record, SegmentInfo};
pub use self::subscription::{
    Delivery, StartPosition, Subscription, SubscriptionConfig, SubscriptionMode, SubscriptionStats,
};
pub use self::topic::{Message, Published, QueueError, Topic, TopicConfig, TopicStats};
