//! Event time at the inputs: the watermark a source's rows imply, which rows are late, and the
//! per-source counters and tables (`weir_source_stats`, `weir_late_rows`, `weir_dead_letters`).
//!
//! The rule (documented in docs/sql.md): a source's watermark is the largest event time read so
//! far minus the declared delay, and never goes back. A row is late when its event time is
//! strictly below the watermark computed from the rows before it; a row exactly at the
//! watermark is on time. Every dataflow reading a source derives the same watermark, because it
//! reads the same messages in the same order.

use std::collections::VecDeque;
use std::sync::Mutex;

use arrow::array::{Array, TimestampNanosecondArray};

use super::{EventTime, NO_WATERMARK};
use crate::connector::api::BadMessage;
use crate::types::{WeirError, WeirResult};

/// Kept entries of `weir_late_rows` and `weir_dead_letters` per source; older ones are dropped
/// from the tables (the counters keep counting).
const KEPT_ENTRIES_MAX: usize = 10_000;

/// `WATERMARK FOR column AS column - delay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatermarkSpec {
    /// Index of the event-time column in the source's rows.
    pub column: usize,
    pub delay_ns: i64,
    /// `idle_timeout`: after this long without a message, event time is taken to advance with
    /// wall-clock time, so the watermark moves and windows close. `None`: it never does.
    pub idle_timeout_ms: Option<u64>,
}

impl WatermarkSpec {
    /// The watermark after seeing `max_event_time`.
    pub fn watermark(&self, max_event_time: EventTime) -> EventTime {
        if max_event_time == NO_WATERMARK {
            NO_WATERMARK
        } else {
            max_event_time.saturating_sub(self.delay_ns)
        }
    }

    /// The late rows of a batch, given the largest event time seen before it: each late row's
    /// index with the watermark it met; and the new largest event time. Event times must be
    /// non-null (sources send rows without one to the dead letters).
    pub fn late_rows(
        &self,
        times: &TimestampNanosecondArray,
        mut max_event_time: EventTime,
    ) -> WeirResult<(Vec<(usize, EventTime)>, EventTime)> {
        if times.null_count() > 0 {
            return Err(WeirError::internal("event time NULL after decoding"));
        }
        let mut late = Vec::new();
        for (row, &t) in times.values().iter().enumerate() {
            let watermark = self.watermark(max_event_time);
            if t < watermark {
                late.push((row, watermark));
            }
            max_event_time = max_event_time.max(t);
        }
        Ok((late, max_event_time))
    }
}

/// A row dropped because it arrived behind the watermark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LateRow {
    pub partition: u32,
    pub offset: u64,
    pub event_time: EventTime,
    pub watermark: EventTime,
}

/// A message that did not decode.
pub type DeadLetter = BadMessage;

/// Counters and recent entries for one source, shared by every dataflow that reads it. Each
/// message is counted once: a reader records only offsets past what any reader recorded.
#[derive(Debug)]
pub struct SourceStats {
    pub source: String,
    inner: Mutex<StatsInner>,
}

#[derive(Debug, Default, Clone)]
struct StatsInner {
    /// Per partition: offsets below this are counted.
    recorded: Vec<u64>,
    messages: u64,
    dead_letters: u64,
    late_rows: u64,
    watermark: Option<EventTime>,
    dead: VecDeque<DeadLetter>,
    late: VecDeque<LateRow>,
}

/// A copy of a source's counters.
#[derive(Debug, Clone)]
pub struct SourceStatsSnapshot {
    pub messages: u64,
    pub dead_letters: u64,
    pub late_rows: u64,
    pub watermark: Option<EventTime>,
    pub dead: Vec<DeadLetter>,
    pub late: Vec<LateRow>,
}

impl SourceStats {
    pub fn new(source: impl Into<String>) -> SourceStats {
        SourceStats {
            source: source.into(),
            inner: Mutex::new(StatsInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what one read of `partition` found: the offsets of its good rows, its bad
    /// messages and late rows, up to `end` (the partition position after the read).
    pub fn record(
        &self,
        partition: u32,
        end: u64,
        row_offsets: &[u64],
        bad: &[BadMessage],
        late: Vec<LateRow>,
        watermark: EventTime,
    ) {
        let mut s = self.lock();
        let p = partition as usize;
        if s.recorded.len() <= p {
            s.recorded.resize(p + 1, 0);
        }
        let from = s.recorded[p];
        if watermark != NO_WATERMARK {
            s.watermark = Some(s.watermark.map_or(watermark, |w| w.max(watermark)));
        }
        if end <= from {
            return;
        }
        s.recorded[p] = end;
        let new_rows = row_offsets.iter().filter(|&&o| o >= from).count() as u64;
        let new_bad: Vec<&BadMessage> = bad.iter().filter(|b| b.offset >= from).collect();
        s.messages += new_rows + new_bad.len() as u64;
        s.dead_letters += new_bad.len() as u64;
        for b in new_bad {
            s.dead.push_back(b.clone());
            if s.dead.len() > KEPT_ENTRIES_MAX {
                s.dead.pop_front();
            }
        }
        for l in late.into_iter().filter(|l| l.offset >= from) {
            s.late_rows += 1;
            s.late.push_back(l);
            if s.late.len() > KEPT_ENTRIES_MAX {
                s.late.pop_front();
            }
        }
    }

    /// Raises the reported watermark (an idle source's, advanced by wall-clock time).
    pub fn raise_watermark(&self, watermark: EventTime) {
        let mut s = self.lock();
        s.watermark = Some(s.watermark.map_or(watermark, |w| w.max(watermark)));
    }

    pub fn snapshot(&self) -> SourceStatsSnapshot {
        let s = self.lock();
        SourceStatsSnapshot {
            messages: s.messages,
            dead_letters: s.dead_letters,
            late_rows: s.late_rows,
            watermark: s.watermark,
            dead: s.dead.iter().cloned().collect(),
            late: s.late.iter().cloned().collect(),
        }
    }
}
