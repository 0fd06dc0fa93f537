//! [`TopicSink`]: a view's output published to a built-in topic, exactly once.
//!
//! Rows are encoded (JSON or CSV, the source formats) as they arrive and held until their
//! epoch's checkpoint is durable; `commit` then publishes them in one append. Each message
//! carries `weir.sink` (the sink's name) and `weir.seq` (`<epoch>-<n>`) headers and is keyed by
//! that sequence, so its partition is fixed. After a crash, recovery publishes only the
//! messages of the restored epoch that are not in the topic yet (found by scanning from the
//! end offsets recorded at pre-commit): nothing is lost and nothing is published twice.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::connector::api::{Sink, encode_appends};
use crate::format::decode::SourceFormat;
use crate::queue::Topic;
use crate::queue::topic::Message;
use crate::types::{ChangeBatch, SqlState, WeirError, WeirResult};

const SINK_HEADER: &str = "weir.sink";
const SEQ_HEADER: &str = "weir.seq";

pub struct TopicSink {
    name: String,
    topic: Arc<Topic>,
    format: SourceFormat,
    /// Encoded rows of the open epoch.
    open: Vec<Vec<u8>>,
    /// Pre-committed epochs waiting for their commit: (epoch, end offsets before, payloads).
    staged: Vec<(u64, Vec<u64>, Vec<Vec<u8>>)>,
}

impl TopicSink {
    pub fn new(name: &str, topic: Arc<Topic>, format: SourceFormat) -> TopicSink {
        TopicSink {
            name: name.to_string(),
            topic,
            format,
            open: Vec::new(),
            staged: Vec::new(),
        }
    }

    fn messages(&self, epoch: u64, payloads: &[Vec<u8>], skip: &HashSet<String>) -> Vec<Message> {
        payloads
            .iter()
            .enumerate()
            .filter_map(|(n, p)| {
                let seq = format!("{epoch}-{n}");
                if skip.contains(&seq) {
                    return None;
                }
                Some(Message {
                    key: Some(Bytes::from(format!("{}/{seq}", self.name))),
                    payload: Bytes::from(p.clone()),
                    headers: vec![
                        (SINK_HEADER.to_string(), Bytes::from(self.name.clone())),
                        (SEQ_HEADER.to_string(), Bytes::from(seq)),
                    ],
                })
            })
            .collect()
    }

    /// Sequences of this sink already in the topic after `from` (per partition).
    fn published_since(&self, from: &[u64]) -> WeirResult<HashSet<String>> {
        let mut seen = HashSet::new();
        for (p, &start) in from.iter().enumerate() {
            let mut at = start.max(self.topic.start_offset(p as u32));
            let end = self.topic.end_offset(p as u32);
            while at < end {
                let records = self
                    .topic
                    .read(p as u32, at, 4096)
                    .map_err(|e| WeirError::new(SqlState::IO_ERROR, e.to_string()))?;
                let Some(last) = records.last() else { break };
                at = last.offset + 1;
                for r in &records {
                    let ours = r
                        .headers
                        .iter()
                        .any(|(k, v)| k == SINK_HEADER && v.as_ref() == self.name.as_bytes());
                    if !ours {
                        continue;
                    }
                    if let Some((_, seq)) = r.headers.iter().find(|(k, _)| k == SEQ_HEADER) {
                        seen.insert(String::from_utf8_lossy(seq).into_owned());
                    }
                }
            }
        }
        Ok(seen)
    }

    fn publish(&self, epoch: u64, payloads: &[Vec<u8>], skip: &HashSet<String>) -> WeirResult<()> {
        let messages = self.messages(epoch, payloads, skip);
        if messages.is_empty() {
            return Ok(());
        }
        self.topic
            .publish(&messages)
            .map(|_| ())
            .map_err(|e| WeirError::new(SqlState::IO_ERROR, format!("topic sink: {e}")))
    }
}

#[async_trait]
impl Sink for TopicSink {
    fn describe(&self) -> String {
        format!("builtin topic {}", self.topic.name())
    }

    fn write(&mut self, changes: &ChangeBatch) -> WeirResult<()> {
        let encoded = encode_appends(changes, self.format, "topic")?;
        self.open.extend(encoded);
        Ok(())
    }

    async fn precommit(&mut self, epoch: u64) -> WeirResult<Vec<u8>> {
        let ends: Vec<u64> = (0..self.topic.partitions())
            .map(|p| self.topic.end_offset(p))
            .collect();
        let payloads = std::mem::take(&mut self.open);
        let mut w = Vec::new();
        put_u64(&mut w, epoch);
        put_u64(&mut w, ends.len() as u64);
        for e in &ends {
            put_u64(&mut w, *e);
        }
        put_u64(&mut w, payloads.len() as u64);
        for p in &payloads {
            put_u64(&mut w, p.len() as u64);
            w.extend_from_slice(p);
        }
        self.staged.push((epoch, ends, payloads));
        Ok(w)
    }

    async fn commit(&mut self, epoch: u64) -> WeirResult<()> {
        let ready: Vec<_> = self
            .staged
            .iter()
            .filter(|s| s.0 <= epoch)
            .cloned()
            .collect();
        for (e, _, payloads) in &ready {
            self.publish(*e, payloads, &HashSet::new())?;
        }
        self.staged.retain(|s| s.0 > epoch);
        Ok(())
    }

    async fn restore(&mut self, _epoch: u64, state: Option<&[u8]>) -> WeirResult<()> {
        self.open.clear();
        self.staged.clear();
        let Some(state) = state else { return Ok(()) };
        let mut r = state;
        let epoch = take_u64(&mut r)?;
        let ends = (0..take_u64(&mut r)?)
            .map(|_| take_u64(&mut r))
            .collect::<WeirResult<Vec<_>>>()?;
        let mut payloads = Vec::new();
        for _ in 0..take_u64(&mut r)? {
            let n = usize::try_from(take_u64(&mut r)?).map_err(|_| corrupt())?;
            let (p, rest) = r.split_at_checked(n).ok_or_else(corrupt)?;
            payloads.push(p.to_vec());
            r = rest;
        }
        // The epoch's commit may have run (fully or in part) before the crash.
        let done = self.published_since(&ends)?;
        self.publish(epoch, &payloads, &done)
    }
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn corrupt() -> WeirError {
    WeirError::new(
        SqlState::DATA_CORRUPTED,
        "topic sink checkpoint state is unreadable",
    )
}

fn take_u64(r: &mut &[u8]) -> WeirResult<u64> {
    let (head, rest) = r.split_at_checked(8).ok_or_else(corrupt)?;
    *r = rest;
    Ok(u64::from_le_bytes(head.try_into().map_err(|_| corrupt())?))
}
