//! `connector = 'nexmark'`: a deterministic Nexmark bid generator as a source, for benchmarks
//! and demos without a broker.
//!
//! It follows the shape of the Nexmark generator (and of `../shared/nexmark/gen_nexmark.py`):
//! per block of 50 event ids, 1 person, 3 auctions and 46 bids; event time advances by
//! `1e6 / rate` µs per event id; hot auctions and bidders take most bids; prices are
//! `round(10^(6u) · 100)`; half the bids come from 4 hot channels. Only bids are produced. Each
//! row is a pure function of `(seed, bid number)`, so any batching gives the same stream. The
//! stream is finite (`events` bids), so `FLUSH` returns once all are read.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, TimestampNanosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;

use super::api::{Source, SourceChunk};
use crate::types::{ChangeBatch, SqlState, WeirError, WeirResult};

/// The options `connector = 'nexmark'` takes.
pub const OPTIONS: &[&str] = &[
    "connector",
    "events",
    "rate",
    "seed",
    "base_time",
    "idle_timeout",
];

const PERSON_PROPORTION: u64 = 1;
const AUCTION_PROPORTION: u64 = 3;
const BID_PROPORTION: u64 = 46;
const TOTAL_PROPORTION: u64 = PERSON_PROPORTION + AUCTION_PROPORTION + BID_PROPORTION;
const FIRST_AUCTION_ID: u64 = 1000;
const FIRST_PERSON_ID: u64 = 1000;
const HOT_AUCTION_RATIO: u64 = 2;
const HOT_BIDDERS_RATIO: u64 = 4;
const HOT_BATCH: u64 = 100;
const NUM_IN_FLIGHT_AUCTIONS: u64 = 100;
const NUM_ACTIVE_PEOPLE: u64 = 1000;
const ID_LEAD: u64 = 10;
const HOT_CHANNELS: [&str; 4] = ["Google", "Facebook", "Baidu", "Apple"];
const CHANNELS: u64 = 10_000;

/// Generator settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NexmarkConfig {
    /// Bids in the stream.
    pub events: u64,
    /// Event ids per second of event time.
    pub rate: f64,
    pub seed: u64,
    /// Event time of event id 0, in ms since the epoch.
    pub base_time_ms: i64,
}

impl NexmarkConfig {
    /// From `WITH (...)` options (already checked to be in [`OPTIONS`]).
    pub fn from_options(options: &[(String, String)]) -> WeirResult<NexmarkConfig> {
        let mut config = NexmarkConfig {
            events: 1_000_000,
            rate: 10_000.0,
            seed: 42,
            base_time_ms: 1_704_067_200_000, // 2024-01-01T00:00:00Z
        };
        let bad = |key: &str, value: &str, want: &str| {
            WeirError::new(
                SqlState::INVALID_PARAMETER_VALUE,
                format!("invalid value for nexmark option {key}: \"{value}\""),
            )
            .with_hint(want.to_string())
        };
        for (key, value) in options {
            match key.as_str() {
                "events" => {
                    config.events = value
                        .parse()
                        .map_err(|_| bad(key, value, "a whole number of bids"))?
                }
                "rate" => {
                    config.rate = value
                        .parse::<f64>()
                        .ok()
                        .filter(|r| *r > 0.0)
                        .ok_or_else(|| bad(key, value, "events per second, above 0"))?
                }
                "seed" => {
                    config.seed = value
                        .parse()
                        .map_err(|_| bad(key, value, "a whole number"))?
                }
                "base_time" => {
                    let ns = crate::format::decode::parse_timestamp(value).map_err(|_| {
                        bad(key, value, "a timestamp such as '2024-01-01 00:00:00'")
                    })?;
                    config.base_time_ms = ns / 1_000_000;
                }
                _ => {}
            }
        }
        Ok(config)
    }
}

/// Every column the generator makes; a source declares any of them by name.
pub fn bid_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("auction", DataType::Int64, false),
        Field::new("bidder", DataType::Int64, false),
        Field::new("price", DataType::Int64, false),
        Field::new("channel", DataType::Utf8, false),
        Field::new("url", DataType::Utf8, false),
        Field::new(
            "date_time",
            DataType::Timestamp(TimeUnit::Nanosecond, None),
            false,
        ),
        Field::new("extra", DataType::Utf8, false),
    ]))
}

/// splitmix64: a small, well-mixed hash of (seed, index, stream).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = mix(self.0);
        self.0 % n.max(1)
    }

    fn unit(&mut self) -> f64 {
        self.0 = mix(self.0);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn last_person(event_id: u64) -> u64 {
    let (epoch, offset) = (event_id / TOTAL_PROPORTION, event_id % TOTAL_PROPORTION);
    // With one person per block the offset is always 0; kept general like the generator.
    let offset = if offset >= PERSON_PROPORTION {
        PERSON_PROPORTION - 1
    } else {
        offset
    };
    epoch * PERSON_PROPORTION + offset
}

fn last_auction(event_id: u64) -> u64 {
    let (mut epoch, mut offset) = (event_id / TOTAL_PROPORTION, event_id % TOTAL_PROPORTION);
    if offset < PERSON_PROPORTION {
        epoch = epoch.saturating_sub(1);
        offset = AUCTION_PROPORTION - 1;
    } else if offset >= PERSON_PROPORTION + AUCTION_PROPORTION {
        offset = AUCTION_PROPORTION - 1;
    } else {
        offset -= PERSON_PROPORTION;
    }
    epoch * AUCTION_PROPORTION + offset
}

/// Reads the generated bids; `columns` maps each declared column to a generated one.
pub struct NexmarkSource {
    config: NexmarkConfig,
    schema: SchemaRef,
    columns: Vec<usize>,
    next: u64,
}

impl NexmarkSource {
    /// 42703 for a declared column the generator does not make, 42804 for a wrong type.
    pub fn try_new(config: NexmarkConfig, schema: SchemaRef) -> WeirResult<NexmarkSource> {
        let bids = bid_schema();
        let columns = schema
            .fields()
            .iter()
            .map(|f| {
                let i = bids.index_of(f.name()).map_err(|_| {
                    WeirError::new(
                        SqlState::UNDEFINED_COLUMN,
                        format!("the nexmark generator makes no column \"{}\"", f.name()),
                    )
                    .with_hint(
                        "declare any of auction BIGINT, bidder BIGINT, price BIGINT, channel VARCHAR, url VARCHAR, date_time TIMESTAMP, extra VARCHAR",
                    )
                })?;
                let strings = |t: &DataType| {
                    matches!(t, DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8)
                };
                let same = bids.field(i).data_type() == f.data_type()
                    || (strings(bids.field(i).data_type()) && strings(f.data_type()));
                if !same {
                    return Err(WeirError::new(
                        SqlState::DATATYPE_MISMATCH,
                        format!(
                            "nexmark column \"{}\" has type {}, not {}",
                            f.name(),
                            bids.field(i).data_type(),
                            f.data_type()
                        ),
                    ));
                }
                Ok(i)
            })
            .collect::<WeirResult<Vec<_>>>()?;
        Ok(NexmarkSource {
            config,
            schema,
            columns,
            next: 0,
        })
    }

    /// Bids `from..to`, all columns.
    fn generate(&self, from: u64, to: u64) -> Vec<ArrayRef> {
        let n = (to - from) as usize;
        let mut auction = Vec::with_capacity(n);
        let mut bidder = Vec::with_capacity(n);
        let mut price = Vec::with_capacity(n);
        let mut channel = Vec::with_capacity(n);
        let mut url = Vec::with_capacity(n);
        let mut time = Vec::with_capacity(n);
        let mut extra = Vec::with_capacity(n);
        let inter_event_us = 1_000_000.0 / self.config.rate;
        for bid in from..to {
            let event_id = bid / BID_PROPORTION * TOTAL_PROPORTION
                + PERSON_PROPORTION
                + AUCTION_PROPORTION
                + bid % BID_PROPORTION;
            let mut r = Rng(mix(self.config.seed ^ mix(bid)));
            let a = if r.below(HOT_AUCTION_RATIO) > 0 {
                last_auction(event_id) / HOT_BATCH * HOT_BATCH
            } else {
                let max = last_auction(event_id);
                let min = max.saturating_sub(NUM_IN_FLIGHT_AUCTIONS);
                min + r.below(max - min + 1 + ID_LEAD)
            };
            let b = if r.below(HOT_BIDDERS_RATIO) > 0 {
                last_person(event_id) / HOT_BATCH * HOT_BATCH + 1
            } else {
                let people = last_person(event_id) + 1;
                let active = people.min(NUM_ACTIVE_PEOPLE);
                people - active + r.below(active + ID_LEAD)
            };
            auction.push((a + FIRST_AUCTION_ID) as i64);
            bidder.push((b + FIRST_PERSON_ID) as i64);
            price.push((10f64.powf(r.unit() * 6.0) * 100.0).round() as i64);
            if r.below(2) > 0 {
                let c = HOT_CHANNELS[r.below(HOT_CHANNELS.len() as u64) as usize];
                channel.push(c.to_string());
                url.push(format!(
                    "https://www.nexmark.com/{}/item.htm?query=1",
                    c.to_lowercase()
                ));
            } else {
                let c = r.below(CHANNELS);
                channel.push(format!("channel-{c}"));
                url.push(format!(
                    "https://www.nexmark.com/c{c}/item.htm?query=1&channel_id={c}"
                ));
            }
            // `as` saturates, so extreme rates give extreme, not wrapped, times.
            let ms = self
                .config
                .base_time_ms
                .saturating_add((event_id as f64 * inter_event_us) as i64 / 1000);
            time.push(ms.saturating_mul(1_000_000));
            let len = 48 + r.below(40) as usize;
            extra.push("x".repeat(len));
        }
        vec![
            Arc::new(Int64Array::from(auction)),
            Arc::new(Int64Array::from(bidder)),
            Arc::new(Int64Array::from(price)),
            Arc::new(StringArray::from(channel)),
            Arc::new(StringArray::from(url)),
            Arc::new(TimestampNanosecondArray::from(time)),
            Arc::new(StringArray::from(extra)),
        ]
    }
}

#[async_trait]
impl Source for NexmarkSource {
    fn poll(&mut self, max_messages: usize) -> WeirResult<Option<SourceChunk>> {
        if self.next >= self.config.events {
            return Ok(None);
        }
        let from = self.next;
        let to = (from + max_messages.max(1) as u64).min(self.config.events);
        self.next = to;
        let all = self.generate(from, to);
        let columns = self
            .columns
            .iter()
            .zip(self.schema.fields())
            .map(|(&i, f)| arrow::compute::cast(&all[i], f.data_type()))
            .collect::<Result<Vec<ArrayRef>, _>>()
            .map_err(|e| WeirError::internal(format!("nexmark column: {e}")))?;
        let nullable = Arc::new(Schema::new(
            self.schema
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<_>>(),
        ));
        let options =
            arrow::array::RecordBatchOptions::new().with_row_count(Some((to - from) as usize));
        let rows = RecordBatch::try_new_with_options(nullable, columns, &options)
            .map_err(|e| WeirError::internal(format!("nexmark rows: {e}")))?;
        Ok(Some(SourceChunk {
            partition: 0,
            changes: ChangeBatch::inserts(rows),
            offsets: (from..to).collect(),
            bad: Vec::new(),
        }))
    }

    fn positions(&self) -> Vec<u64> {
        vec![self.next]
    }

    fn seek(&mut self, positions: &[u64]) -> WeirResult<()> {
        self.next = positions
            .first()
            .copied()
            .unwrap_or(0)
            .min(self.config.events);
        Ok(())
    }

    fn published(&self) -> Vec<u64> {
        vec![self.config.events]
    }

    async fn wait(&self, deadline: tokio::time::Instant) {
        // A finite stream: once read, nothing more will come.
        tokio::time::sleep_until(deadline).await;
    }

    fn append_only(&self) -> bool {
        true
    }
}
