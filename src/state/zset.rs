//! [`ZSetState`]: a multiset of rows stored as Arrow batches, changed by
//! weighted [`ChangeBatch`]es.
//!
//! Inserts append (coalescing small batches so scans stay batch-sized) and
//! index each row by a hash of its Arrow row-format encoding; a retraction
//! finds an equal live row through that index (comparing the encodings) and
//! marks it dead, so its cost does not depend on how many rows are stored.
//! Dead rows are filtered out of [`ZSetState::snapshot`]; a batch that is
//! mostly dead is rewritten, and the list of batches is compacted once most
//! of them are empty, keeping the rows in insertion order. The optional
//! primary-key index holds the encoded key of every live row so uniqueness is
//! checked before a change is logged.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;

use arrow::array::{Array, BooleanArray, RecordBatch, UInt32Array};
use arrow::buffer::BooleanBuffer;
use arrow::compute::{concat_batches, filter_record_batch, take_record_batch};
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, SortField};
use arrow::util::display::{ArrayFormatter, FormatOptions};

use crate::types::{ChangeBatch, SqlState, WeirError, WeirResult};

/// Batches smaller than this are merged with the next insert.
const COALESCE_ROWS: usize = 8192;

/// The consolidated contents of a table: every stored row has weight +1.
pub struct ZSetState {
    schema: SchemaRef,
    batches: Vec<Stored>,
    /// Live rows.
    rows: usize,
    primary_key: Option<KeyIndex>,
    /// Encodes whole rows: what equality and the index's hashes are over.
    converter: RowConverter,
    hasher: std::collections::hash_map::RandomState,
    /// Every live row as (batch, row), found by the hash of its encoding.
    index: hashbrown::HashTable<(u32, u32)>,
    /// Batches with no live row left (compacted away once they are most of them).
    empty_batches: usize,
}

/// One stored batch and which of its rows are dead.
struct Stored {
    rows: RecordBatch,
    /// Per row: the hash of its encoding (the index's key).
    hashes: Vec<u64>,
    /// Per row: retracted. Empty while no row is.
    dead: Vec<bool>,
    dead_count: usize,
}

impl Stored {
    fn live(&self) -> usize {
        self.rows.num_rows() - self.dead_count
    }

    /// The live rows (the batch itself while none is dead).
    fn live_rows(&self) -> WeirResult<RecordBatch> {
        if self.dead_count == 0 {
            return Ok(self.rows.clone());
        }
        let mask = BooleanArray::new(BooleanBuffer::from_iter(self.dead.iter().map(|d| !d)), None);
        filter_record_batch(&self.rows, &mask).map_err(arrow_err("filtering rows"))
    }
}

impl std::fmt::Debug for ZSetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZSetState")
            .field("schema", &self.schema)
            .field("batches", &self.batches.len())
            .field("rows", &self.rows)
            .finish()
    }
}

#[derive(Debug)]
struct KeyIndex {
    columns: Vec<usize>,
    converter: RowConverter,
    keys: HashSet<Vec<u8>>,
}

fn arrow_err(context: &str) -> impl Fn(arrow::error::ArrowError) -> WeirError + '_ {
    move |e| WeirError::internal(format!("{context}: {e}"))
}

fn row_converter(schema: &SchemaRef, columns: &[usize]) -> WeirResult<RowConverter> {
    let fields = columns
        .iter()
        .map(|&i| SortField::new(schema.field(i).data_type().clone()))
        .collect();
    RowConverter::new(fields).map_err(|e| {
        WeirError::unsupported(
            format!("column types cannot be compared for equality: {e}"),
            "use scalar column types (numbers, text, timestamps) for keys",
        )
    })
}

impl ZSetState {
    /// An empty state; `primary_key` lists key column indices (empty = none).
    pub fn try_new(schema: SchemaRef, primary_key: Vec<usize>) -> WeirResult<Self> {
        let primary_key = if primary_key.is_empty() {
            None
        } else {
            Some(KeyIndex {
                converter: row_converter(&schema, &primary_key)?,
                columns: primary_key,
                keys: HashSet::new(),
            })
        };
        let all: Vec<usize> = (0..schema.fields().len()).collect();
        Ok(ZSetState {
            converter: row_converter(&schema, &all)?,
            schema,
            batches: Vec::new(),
            rows: 0,
            primary_key,
            hasher: Default::default(),
            index: hashbrown::HashTable::new(),
            empty_batches: 0,
        })
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// The current rows; cheap for batches without retracted rows (they share buffers).
    pub fn snapshot(&self) -> Vec<RecordBatch> {
        self.batches
            .iter()
            .filter(|b| b.live() > 0)
            .filter_map(|b| b.live_rows().ok())
            .collect()
    }

    pub fn num_rows(&self) -> usize {
        self.rows
    }

    /// Checks that applying `change` keeps the primary key unique and the
    /// NOT NULL columns filled, without changing anything. Errors are the
    /// client's (23505, 23502).
    pub fn check(&self, change: &ChangeBatch) -> WeirResult<()> {
        let (inserts, deletes) = split_by_sign(change)?;
        if let Some(inserts) = &inserts {
            for (idx, field) in self.schema.fields().iter().enumerate() {
                if !field.is_nullable() && inserts.column(idx).null_count() > 0 {
                    return Err(WeirError::new(
                        SqlState::NOT_NULL_VIOLATION,
                        format!(
                            "null value in column \"{}\" violates not-null constraint",
                            field.name()
                        ),
                    )
                    .with_hint("give the column a value, or drop NOT NULL from its definition"));
                }
            }
        }
        let (Some(index), Some(inserts)) = (&self.primary_key, &inserts) else {
            return Ok(());
        };
        let removed: HashSet<Vec<u8>> = match &deletes {
            Some(d) => index.encode(d)?.into_iter().collect(),
            None => HashSet::new(),
        };
        let mut added = HashSet::new();
        for (row, key) in index.encode(inserts)?.into_iter().enumerate() {
            let taken =
                (index.keys.contains(&key) && !removed.contains(&key)) || !added.insert(key);
            if taken {
                return Err(index.duplicate_error(&self.schema, inserts, row));
            }
        }
        Ok(())
    }

    /// Applies a change that [`ZSetState::check`] accepted (or that was
    /// already accepted once, during log replay). A retraction of a row that
    /// is not present means the log and state disagree: an error, not a panic.
    pub fn apply(&mut self, change: &ChangeBatch) -> WeirResult<()> {
        let (inserts, deletes) = split_by_sign(change)?;
        if let Some(deletes) = deletes {
            self.retract(&deletes)?;
        }
        if let Some(inserts) = inserts {
            self.insert(inserts)?;
        }
        Ok(())
    }

    fn insert(&mut self, rows: RecordBatch) -> WeirResult<()> {
        if rows.num_rows() == 0 {
            return Ok(());
        }
        // try_new re-validates NOT NULL against the table's own schema.
        let rows = RecordBatch::try_new(self.schema.clone(), rows.columns().to_vec())
            .map_err(arrow_err("inserted rows do not match the table"))?;
        if let Some(index) = &mut self.primary_key {
            for key in index.encode(&rows)? {
                index.keys.insert(key);
            }
        }
        let encoded = self
            .converter
            .convert_columns(rows.columns())
            .map_err(arrow_err("encoding inserted rows"))?;
        let hashes: Vec<u64> = encoded
            .iter()
            .map(|r| self.hasher.hash_one(r.as_ref()))
            .collect();
        self.rows += rows.num_rows();
        let coalesce = self
            .batches
            .last()
            .is_some_and(|last| last.rows.num_rows() + rows.num_rows() <= COALESCE_ROWS);
        let (b, first_row) = if coalesce {
            let b = self.batches.len() - 1;
            let last = &mut self.batches[b];
            let first_row = last.rows.num_rows();
            if last.live() == 0 {
                self.empty_batches -= 1;
            }
            last.rows = concat_batches(&self.schema, [&last.rows, &rows])
                .map_err(arrow_err("coalescing batches"))?;
            last.hashes.extend(hashes);
            if !last.dead.is_empty() {
                last.dead.resize(last.rows.num_rows(), false);
            }
            (b, first_row)
        } else {
            self.batches.push(Stored {
                rows,
                hashes,
                dead: Vec::new(),
                dead_count: 0,
            });
            (self.batches.len() - 1, 0)
        };
        self.index_rows(b, first_row);
        Ok(())
    }

    fn retract(&mut self, rows: &RecordBatch) -> WeirResult<()> {
        let wanted = self
            .converter
            .convert_columns(rows.columns())
            .map_err(arrow_err("encoding retracted rows"))?;
        let mut missing = 0;
        let mut touched = Vec::new();
        for row in wanted.iter() {
            let h = self.hasher.hash_one(row.as_ref());
            let batches = &self.batches;
            let converter = &self.converter;
            let found = self.index.find_entry(h, |&(b, r)| {
                let stored = &batches[b as usize];
                stored.hashes[r as usize] == h
                    && encode_row(converter, &stored.rows, r as usize)
                        .is_some_and(|bytes| bytes == row.as_ref())
            });
            let Ok(entry) = found else {
                missing += 1;
                continue;
            };
            let ((b, r), _) = entry.remove();
            let stored = &mut self.batches[b as usize];
            if stored.dead.is_empty() {
                stored.dead = vec![false; stored.rows.num_rows()];
            }
            stored.dead[r as usize] = true;
            stored.dead_count += 1;
            self.rows -= 1;
            touched.push(b as usize);
        }
        if let Some(index) = &mut self.primary_key {
            for key in index.encode(rows)? {
                index.keys.remove(&key);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for b in touched {
            self.compact_batch(b)?;
        }
        if self.empty_batches > 16 && self.empty_batches * 2 > self.batches.len() {
            self.compact_batches();
        }
        if missing > 0 {
            return Err(WeirError::new(
                SqlState::DATA_CORRUPTED,
                format!("{missing} retracted rows are not present in the table"),
            ));
        }
        Ok(())
    }

    /// Rewrites batch `b` without its dead rows once most of them are dead (an empty batch
    /// stays, empty, until [`Self::compact_batches`]).
    fn compact_batch(&mut self, b: usize) -> WeirResult<()> {
        let stored = &self.batches[b];
        if stored.dead_count * 2 <= stored.rows.num_rows() {
            return Ok(());
        }
        let live_rows = stored.live_rows()?;
        let old: Vec<(u32, u64)> = (0..stored.rows.num_rows())
            .filter(|&r| !stored.dead[r])
            .map(|r| (r as u32, stored.hashes[r]))
            .collect();
        for (r, h) in &old {
            if let Ok(entry) = self.index.find_entry(*h, |&e| e == (b as u32, *r)) {
                entry.remove();
            }
        }
        if live_rows.num_rows() == 0 {
            self.empty_batches += 1;
        }
        self.batches[b] = Stored {
            rows: live_rows,
            hashes: old.into_iter().map(|(_, h)| h).collect(),
            dead: Vec::new(),
            dead_count: 0,
        };
        self.index_rows(b, 0);
        Ok(())
    }

    /// Indexes the rows of batch `b` from `first_row` on (all live: new or rewritten).
    fn index_rows(&mut self, b: usize, first_row: usize) {
        let batches = &self.batches;
        for (r, &h) in batches[b].hashes.iter().enumerate().skip(first_row) {
            self.index
                .insert_unique(h, (b as u32, r as u32), |&(b, r)| {
                    batches[b as usize].hashes[r as usize]
                });
        }
    }

    /// Drops the empty batches and renumbers the index (rows keep their order).
    fn compact_batches(&mut self) {
        self.batches.retain(|b| b.live() > 0);
        self.empty_batches = 0;
        self.index.clear();
        let batches = &self.batches;
        for (b, stored) in batches.iter().enumerate() {
            for (r, &h) in stored.hashes.iter().enumerate() {
                if stored.dead.get(r).copied().unwrap_or(false) {
                    continue;
                }
                self.index
                    .insert_unique(h, (b as u32, r as u32), |&(b, r)| {
                        batches[b as usize].hashes[r as usize]
                    });
            }
        }
    }
}

/// Row `row` of `batch` in the row format (None if it cannot be encoded, which a batch of
/// the state's own schema always can).
fn encode_row(converter: &RowConverter, batch: &RecordBatch, row: usize) -> Option<Vec<u8>> {
    let columns: Vec<_> = batch.columns().iter().map(|c| c.slice(row, 1)).collect();
    let rows = converter.convert_columns(&columns).ok()?;
    Some(rows.row(0).as_ref().to_vec())
}

impl KeyIndex {
    fn encode(&self, batch: &RecordBatch) -> WeirResult<Vec<Vec<u8>>> {
        let columns: Vec<_> = self
            .columns
            .iter()
            .map(|&i| batch.column(i).clone())
            .collect();
        let rows = self
            .converter
            .convert_columns(&columns)
            .map_err(arrow_err("encoding key"))?;
        Ok(rows.iter().map(|r| r.as_ref().to_vec()).collect())
    }

    fn duplicate_error(&self, schema: &SchemaRef, batch: &RecordBatch, row: usize) -> WeirError {
        let names: Vec<&str> = self
            .columns
            .iter()
            .map(|&i| schema.field(i).name().as_str())
            .collect();
        let options = FormatOptions::default().with_null("NULL");
        let values: Vec<String> = self
            .columns
            .iter()
            .map(|&i| {
                ArrayFormatter::try_new(batch.column(i).as_ref(), &options)
                    .map(|f| f.value(row).to_string())
                    .unwrap_or_else(|_| "?".to_string())
            })
            .collect();
        WeirError::new(
            SqlState::UNIQUE_VIOLATION,
            "duplicate key value violates unique constraint",
        )
        .with_detail(format!(
            "Key ({})=({}) already exists.",
            names.join(", "),
            values.join(", ")
        ))
        .with_hint("use UPDATE to change the existing row, or DELETE it first")
    }
}

/// Splits a change into its inserted rows and its retracted rows; a weight of
/// n > 1 stands for n copies.
fn split_by_sign(change: &ChangeBatch) -> WeirResult<(Option<RecordBatch>, Option<RecordBatch>)> {
    let Some(weights) = &change.weights else {
        return Ok((Some(change.rows.clone()), None));
    };
    let mut plus = Vec::new();
    let mut minus = Vec::new();
    for (row, w) in weights.values().iter().enumerate() {
        let target = if *w > 0 { &mut plus } else { &mut minus };
        for _ in 0..w.unsigned_abs() {
            target.push(row as u32);
        }
    }
    let pick = |indices: Vec<u32>| -> WeirResult<Option<RecordBatch>> {
        if indices.is_empty() {
            return Ok(None);
        }
        let indices = UInt32Array::from(indices);
        take_record_batch(&change.rows, &indices)
            .map(Some)
            .map_err(arrow_err("splitting change batch"))
    };
    Ok((pick(plus)?, pick(minus)?))
}

/// The net effect of `changes` (rows of `schema`): each distinct row once, with the sum of
/// its weights, rows whose weights cancel left out; `None` when everything cancels. One pass
/// over Arrow's row format, so a checkpoint's changes and recovery's chain cost linear time.
pub fn consolidate(schema: &SchemaRef, changes: &[ChangeBatch]) -> WeirResult<Option<ChangeBatch>> {
    let all: Vec<usize> = (0..schema.fields().len()).collect();
    let converter = row_converter(schema, &all)?;
    // Distinct row → its slot in `net`: (summed weight, batch, row of its first copy).
    let mut slots: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut net: Vec<(i64, usize, usize)> = Vec::new();
    for (b, change) in changes.iter().enumerate() {
        let rows = converter
            .convert_columns(change.rows.columns())
            .map_err(arrow_err("encoding changes"))?;
        for (r, row) in rows.iter().enumerate() {
            let w = change.weights.as_ref().map_or(1, |w| w.value(r));
            match slots.get(row.as_ref()) {
                Some(&slot) => net[slot].0 += w,
                None => {
                    slots.insert(row.as_ref().to_vec(), net.len());
                    net.push((w, b, r));
                }
            }
        }
    }
    let (indices, weights): (Vec<(usize, usize)>, Vec<i64>) = net
        .into_iter()
        .filter(|(w, _, _)| *w != 0)
        .map(|(w, b, r)| ((b, r), w))
        .unzip();
    if indices.is_empty() {
        return Ok(None);
    }
    let batches: Vec<&RecordBatch> = changes.iter().map(|c| &c.rows).collect();
    let rows = arrow::compute::interleave_record_batch(&batches, &indices)
        .map_err(arrow_err("gathering changes"))?;
    Ok(Some(ChangeBatch {
        rows,
        weights: Some(arrow::array::Int64Array::from(weights)),
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn change(keys: &[&str], values: &[i64], weights: &[i64]) -> ChangeBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let rows = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(keys.to_vec())),
                Arc::new(Int64Array::from(values.to_vec())),
            ],
        )
        .unwrap();
        ChangeBatch {
            rows,
            weights: Some(Int64Array::from(weights.to_vec())),
        }
    }

    fn as_tuples(c: &ChangeBatch) -> Vec<(String, i64, i64)> {
        let k = c
            .rows
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        let v = c
            .rows
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        let w = c.weights.as_ref().unwrap();
        let mut out: Vec<_> = (0..c.rows.num_rows())
            .map(|i| (k.value(i).to_string(), v.value(i), w.value(i)))
            .collect();
        out.sort();
        out
    }

    /// Random inserts and retractions (duplicates included, batches big enough to coalesce,
    /// be rewritten and emptied) against a plain multiset.
    #[test]
    fn retractions_through_the_index_match_a_multiset() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let schema = change(&[], &[], &[]).rows.schema();
        let mut state = ZSetState::try_new(schema.clone(), vec![]).unwrap();
        let mut model: HashMap<(String, i64), i64> = HashMap::new();
        for step in 0..300 {
            let n = rng.random_range(1..3000);
            let mut keys = Vec::new();
            let mut values = Vec::new();
            let mut weights = Vec::new();
            let mut planned = model.clone();
            // A change applies its retractions before its inserts: only rows stored before
            // it may be retracted.
            let mut available = model.clone();
            for _ in 0..n {
                let k = format!("k{}", rng.random_range(0..50));
                let v = rng.random_range(0..40);
                let have = available.entry((k.clone(), v)).or_default();
                // Early steps mostly insert, later ones mostly retract what is there.
                let retract = *have > 0 && rng.random_bool(if step < 100 { 0.3 } else { 0.7 });
                if retract {
                    *have -= 1;
                }
                let w = if retract { -1 } else { 1 };
                *planned.entry((k.clone(), v)).or_default() += w;
                keys.push(k);
                values.push(v);
                weights.push(w);
            }
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            state.apply(&change(&keys, &values, &weights)).unwrap();
            model = planned;
            model.retain(|_, n| *n > 0);
            assert_eq!(
                state.num_rows() as i64,
                model.values().sum::<i64>(),
                "step {step}"
            );
        }
        let batches: Vec<ChangeBatch> = state
            .snapshot()
            .into_iter()
            .map(ChangeBatch::inserts)
            .collect();
        let mut got = consolidate(&schema, &batches)
            .unwrap()
            .map(|c| as_tuples(&c))
            .unwrap_or_default();
        let mut want: Vec<(String, i64, i64)> =
            model.into_iter().map(|((k, v), n)| (k, v, n)).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want);
        // Many batches emptied: the list is compacted and the index renumbered, so the rows
        // left can still be retracted.
        let mut state = ZSetState::try_new(schema.clone(), vec![]).unwrap();
        let batch = |i: i64, w: i64| {
            let keys: Vec<String> = (0..5000).map(|r| format!("b{i}r{r}")).collect();
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            change(&keys, &vec![i; 5000], &vec![w; 5000])
        };
        for i in 0..40 {
            state.apply(&batch(i, 1)).unwrap();
        }
        assert_eq!(state.batches.len(), 40);
        for i in 0..30 {
            state.apply(&batch(i, -1)).unwrap();
        }
        assert!(
            state.batches.len() < 30,
            "empty batches were dropped: {}",
            state.batches.len()
        );
        assert_eq!(state.num_rows(), 50_000);
        for i in 30..40 {
            state.apply(&batch(i, -1)).unwrap();
        }
        assert_eq!(state.num_rows(), 0);
        assert!(state.snapshot().is_empty());
        // A row that is not there is an error, not a panic.
        let missing = change(&["nope"], &[1], &[-1]);
        assert_eq!(
            state.apply(&missing).unwrap_err().sqlstate,
            SqlState::DATA_CORRUPTED
        );
    }

    #[test]
    fn consolidate_nets_out_updates_and_keeps_the_rest() {
        // a: 1 → 2 → 3 (two updates), b inserted then deleted, c inserted twice.
        let changes = [
            change(&["a", "b", "c"], &[1, 5, 7], &[1, 1, 1]),
            change(&["a", "a", "b"], &[1, 2, 5], &[-1, 1, -1]),
            change(&["a", "a", "c"], &[2, 3, 7], &[-1, 1, 1]),
        ];
        let schema = changes[0].rows.schema();
        let net = consolidate(&schema, &changes).unwrap().unwrap();
        assert_eq!(
            as_tuples(&net),
            vec![("a".into(), 3, 1), ("c".into(), 7, 2)]
        );
        let gone = [change(&["x"], &[1], &[1]), change(&["x"], &[1], &[-1])];
        assert!(consolidate(&schema, &gone).unwrap().is_none());
        // Applied to a state, the consolidated rows equal applying each change in turn.
        let mut stepwise = ZSetState::try_new(schema.clone(), vec![]).unwrap();
        for c in &changes {
            stepwise.apply(c).unwrap();
        }
        let mut at_once = ZSetState::try_new(schema.clone(), vec![]).unwrap();
        at_once.apply(&net).unwrap();
        assert_eq!(stepwise.num_rows(), at_once.num_rows());
        let all = |s: &ZSetState| {
            let batches: Vec<ChangeBatch> =
                s.snapshot().into_iter().map(ChangeBatch::inserts).collect();
            consolidate(&schema, &batches)
                .unwrap()
                .map(|c| as_tuples(&c))
        };
        assert_eq!(all(&stepwise), all(&at_once));
    }
}
