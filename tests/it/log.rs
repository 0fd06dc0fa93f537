//! The durable log (`weir::queue::Log`) through its public API: round trips, restarts,
//! segment rolls, torn tails, corruption, limits, group commit under concurrency, retention.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use weir::queue::{Log, LogConfig, LogError, NewRecord, Record};

/// Frame header (len + crc) plus the smallest body (offset, timestamp, key_len, header_count).
const EMPTY_FRAME_BYTES: u64 = 8 + 24;

fn record(timestamp_ms: i64, payload: &str) -> NewRecord {
    NewRecord {
        timestamp_ms,
        key: None,
        headers: Vec::new(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
    }
}

fn stored(offset: u64, new: &NewRecord) -> Record {
    Record {
        offset,
        timestamp_ms: new.timestamp_ms,
        key: new.key.clone(),
        headers: new.headers.clone(),
        payload: new.payload.clone(),
    }
}

fn read_all(log: &Log) -> Vec<Record> {
    log.read(0, usize::MAX, usize::MAX).expect("read")
}

fn payloads(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8(r.payload.to_vec()).expect("utf8 payload"))
        .collect()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

/// Segments of 256 bytes: with 60-byte payloads (92-byte frames) each holds two records.
fn small_segments() -> LogConfig {
    LogConfig {
        segment_bytes_max: 256,
        ..LogConfig::default()
    }
}

/// Appends `count` records one at a time, payload `p{i:059}` (60 bytes), timestamp `1000 + i`.
fn append_sixty_byte_records(log: &Log, count: u64) {
    for _ in 0..count {
        let i = log.next_offset();
        let range = log
            .append(&[record(1000 + i as i64, &format!("p{i:059}"))])
            .expect("append");
        assert_eq!(range, i..i + 1);
    }
}

fn flip_byte(path: &Path, pos: u64) {
    let mut bytes = fs::read(path).expect("read segment");
    bytes[pos as usize] ^= 0xff;
    fs::write(path, bytes).expect("write segment");
}

#[test]
fn round_trip_keys_null_keys_headers_and_empty_payload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), LogConfig::default()).expect("open");
    assert_eq!((log.start_offset(), log.next_offset()), (0, 0));
    let records = vec![
        NewRecord {
            timestamp_ms: 1_700_000_000_000,
            key: Some(Bytes::from_static(b"user-1")),
            headers: vec![
                (
                    "content-type".to_owned(),
                    Bytes::from_static(b"application/json"),
                ),
                ("trace".to_owned(), Bytes::new()),
                ("trace".to_owned(), Bytes::from_static(b"second")),
            ],
            payload: Bytes::from_static(br#"{"a":1}"#),
        },
        NewRecord {
            timestamp_ms: -1,
            key: None,
            headers: Vec::new(),
            payload: Bytes::from_static(b"no key"),
        },
        NewRecord {
            timestamp_ms: 0,
            key: Some(Bytes::new()),
            headers: vec![("h\u{e9}".to_owned(), Bytes::from_static(&[0, 1, 2, 255]))],
            payload: Bytes::new(),
        },
        NewRecord {
            timestamp_ms: i64::MAX,
            key: None,
            headers: Vec::new(),
            payload: Bytes::new(),
        },
    ];
    assert_eq!(log.append(&records).expect("append"), 0..4);
    assert_eq!(log.append(&[]).expect("empty append"), 4..4);
    let expected: Vec<Record> = records
        .iter()
        .enumerate()
        .map(|(i, r)| stored(i as u64, r))
        .collect();

    assert_eq!(read_all(&log), expected, "readable before any sync");
    assert_eq!(log.read(2, 100, usize::MAX).expect("read"), expected[2..]);
    assert_eq!(log.read(1, 2, usize::MAX).expect("read"), expected[1..3]);
    assert_eq!(
        log.read(0, 100, 1).expect("read"),
        expected[..1],
        "at least one record even over max_bytes"
    );
    assert_eq!(
        log.read(0, 0, usize::MAX).expect("read"),
        Vec::<Record>::new()
    );
    assert_eq!(
        log.read(4, 100, usize::MAX).expect("read"),
        Vec::<Record>::new()
    );
    assert_eq!(
        log.read(99, 100, usize::MAX).expect("read"),
        Vec::<Record>::new()
    );

    log.sync_all().expect("sync");
    drop(log);
    let log = Log::open(dir.path(), LogConfig::default()).expect("reopen");
    assert_eq!(read_all(&log), expected);
    assert_eq!(log.next_offset(), 4);
    let segments = log.segments();
    assert_eq!(segments.len(), 1);
    assert_eq!(segments[0].max_timestamp_ms, i64::MAX);
}

#[test]
fn offsets_continue_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), LogConfig::default()).expect("open");
    let first = [record(1, "a"), record(2, "b"), record(3, "c")];
    assert_eq!(log.append_durable(&first).expect("append"), 0..3);
    drop(log);

    let log = Log::open(dir.path(), LogConfig::default()).expect("reopen");
    assert_eq!(log.next_offset(), 3);
    assert_eq!(
        log.append_durable(&[record(4, "d"), record(5, "e")])
            .expect("append"),
        3..5
    );
    drop(log);

    let log = Log::open(dir.path(), LogConfig::default()).expect("reopen again");
    let all = read_all(&log);
    assert_eq!(payloads(&all), ["a", "b", "c", "d", "e"]);
    assert_eq!(
        all.iter().map(|r| r.offset).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    assert_eq!(
        all.iter().map(|r| r.timestamp_ms).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
}

#[test]
fn segments_roll_and_reads_span_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), small_segments()).expect("open");
    append_sixty_byte_records(&log, 9);

    let frame = EMPTY_FRAME_BYTES + 60;
    let segments = log.segments();
    assert_eq!(
        segments
            .iter()
            .map(|s| (s.base_offset, s.next_offset, s.bytes, s.max_timestamp_ms))
            .collect::<Vec<_>>(),
        [
            (0, 2, 2 * frame, 1001),
            (2, 4, 2 * frame, 1003),
            (4, 6, 2 * frame, 1005),
            (6, 8, 2 * frame, 1007),
            (8, 9, frame, 1008),
        ]
    );
    assert_eq!(segment_files(dir.path()).len(), 5);

    let expected: Vec<String> = (1..9).map(|i| format!("p{i:059}")).collect();
    let read = log.read(1, usize::MAX, usize::MAX).expect("read");
    assert_eq!(payloads(&read), expected, "one read spans all segments");
    let read = log.read(3, 4, usize::MAX).expect("read");
    assert_eq!(
        read.iter().map(|r| r.offset).collect::<Vec<_>>(),
        [3, 4, 5, 6]
    );
    // Two whole frames fit in max_bytes, the third does not.
    let read = log
        .read(1, usize::MAX, 2 * frame as usize + 10)
        .expect("read");
    assert_eq!(read.iter().map(|r| r.offset).collect::<Vec<_>>(), [1, 2]);

    // A batch is never split: five records go to one new segment together.
    let batch: Vec<NewRecord> = (0..5).map(|i| record(2000 + i, "batch")).collect();
    assert_eq!(log.append(&batch).expect("append batch"), 9..14);
    let last = *log.segments().last().expect("segments");
    assert_eq!((last.base_offset, last.next_offset), (9, 14));
    assert_eq!(last.bytes, 5 * (EMPTY_FRAME_BYTES + 5));
    drop(log);

    let log = Log::open(dir.path(), small_segments()).expect("reopen");
    assert_eq!(log.segments().len(), 6);
    assert_eq!(log.segments()[2].max_timestamp_ms, 1005);
    assert_eq!(log.next_offset(), 14);
    let all = read_all(&log);
    assert_eq!(all.len(), 14);
    assert_eq!(payloads(&all[13..]), ["batch"]);
}

#[test]
fn reads_from_deep_inside_a_large_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), LogConfig::default()).expect("open");
    let batch: Vec<NewRecord> = (0..3000)
        .map(|i| record(i, &format!("record-{i}")))
        .collect();
    assert_eq!(log.append(&batch).expect("append"), 0..3000);
    for from in [0, 1, 127, 1500, 2998, 2999] {
        let read = log.read(from, 3, usize::MAX).expect("read");
        let expected: Vec<u64> = (from..(from + 3).min(3000)).collect();
        assert_eq!(read.iter().map(|r| r.offset).collect::<Vec<_>>(), expected);
        assert_eq!(payloads(&read[..1]), [format!("record-{from}")]);
    }
}

#[test]
fn torn_tail_cut_short_is_dropped_and_appends_continue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), LogConfig::default()).expect("open");
    let records: Vec<NewRecord> = (0..5).map(|i| record(i, &format!("r{i}"))).collect();
    log.append_durable(&records).expect("append");
    drop(log);

    let [file] = segment_files(dir.path()).try_into().expect("one segment");
    let frame = EMPTY_FRAME_BYTES + 2;
    assert_eq!(fs::metadata(&file).expect("stat").len(), 5 * frame);
    OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open segment")
        .set_len(5 * frame - 3)
        .expect("truncate");

    let log = Log::open(dir.path(), LogConfig::default()).expect("reopen");
    assert_eq!(log.next_offset(), 4);
    assert_eq!(payloads(&read_all(&log)), ["r0", "r1", "r2", "r3"]);
    assert_eq!(
        fs::metadata(&file).expect("stat").len(),
        4 * frame,
        "tail cut on disk"
    );
    assert_eq!(
        log.append_durable(&[record(9, "new")]).expect("append"),
        4..5
    );
    drop(log);

    let log = Log::open(dir.path(), LogConfig::default()).expect("reopen again");
    assert_eq!(payloads(&read_all(&log)), ["r0", "r1", "r2", "r3", "new"]);
}

#[test]
fn torn_tail_of_garbage_or_zeros_is_cut() {
    for garbage in [vec![0xab; 13], vec![0; 4096], vec![0x01, 0x02, 0x03]] {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::open(dir.path(), LogConfig::default()).expect("open");
        let records: Vec<NewRecord> = (0..5).map(|i| record(i, &format!("r{i}"))).collect();
        log.append_durable(&records).expect("append");
        drop(log);

        let [file] = segment_files(dir.path()).try_into().expect("one segment");
        let good_len = fs::metadata(&file).expect("stat").len();
        OpenOptions::new()
            .append(true)
            .open(&file)
            .expect("open segment")
            .write_all(&garbage)
            .expect("append garbage");

        let log = Log::open(dir.path(), LogConfig::default()).expect("reopen");
        assert_eq!(log.next_offset(), 5, "garbage of {} bytes", garbage.len());
        assert_eq!(payloads(&read_all(&log)), ["r0", "r1", "r2", "r3", "r4"]);
        assert_eq!(fs::metadata(&file).expect("stat").len(), good_len);
        assert_eq!(log.append(&[record(5, "r5")]).expect("append"), 5..6);
        assert_eq!(payloads(&log.read(5, 1, usize::MAX).expect("read")), ["r5"]);
    }
}

#[test]
fn torn_tail_with_a_flipped_byte_drops_only_the_last_frame() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), small_segments()).expect("open");
    append_sixty_byte_records(&log, 5); // segments [0, 2), [2, 4), [4, 5)
    drop(log);

    let files = segment_files(dir.path());
    assert_eq!(files.len(), 3);
    let last = &files[2];
    let len = fs::metadata(last).expect("stat").len();
    flip_byte(last, len - 1); // last byte of the last record's payload

    let log = Log::open(dir.path(), small_segments()).expect("reopen");
    assert_eq!(log.next_offset(), 4);
    assert_eq!(fs::metadata(last).expect("stat").len(), 0);
    assert_eq!(read_all(&log).len(), 4);
    assert_eq!(
        log.segments()
            .iter()
            .map(|s| s.next_offset)
            .collect::<Vec<_>>(),
        [2, 4, 4],
        "older segments untouched, last one emptied"
    );
    append_sixty_byte_records(&log, 2);
    drop(log);

    let log = Log::open(dir.path(), small_segments()).expect("reopen again");
    let all = read_all(&log);
    assert_eq!(
        all.iter().map(|r| r.offset).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4, 5]
    );
    assert_eq!(payloads(&all[4..5]), [format!("p{:059}", 4)]);
}

#[test]
fn flipped_byte_in_a_middle_frame_of_the_last_segment_cuts_from_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), LogConfig::default()).expect("open");
    let records: Vec<NewRecord> = (0..5).map(|i| record(i, &format!("r{i}"))).collect();
    log.append_durable(&records).expect("append");
    drop(log);

    let [file] = segment_files(dir.path()).try_into().expect("one segment");
    let frame = EMPTY_FRAME_BYTES + 2;
    flip_byte(&file, 2 * frame + 10); // inside record 2's offset field

    let log = Log::open(dir.path(), LogConfig::default()).expect("reopen");
    assert_eq!(log.next_offset(), 2);
    assert_eq!(payloads(&read_all(&log)), ["r0", "r1"]);
    assert_eq!(fs::metadata(&file).expect("stat").len(), 2 * frame);
}

#[test]
fn corruption_in_an_older_segment_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), small_segments()).expect("open");
    append_sixty_byte_records(&log, 6);
    drop(log);
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 3);

    flip_byte(&files[0], 100); // inside the second frame of the first segment
    match Log::open(dir.path(), small_segments()) {
        Err(LogError::Corrupt {
            path,
            offset,
            reason,
        }) => {
            assert_eq!(path, files[0]);
            assert_eq!(
                offset,
                EMPTY_FRAME_BYTES + 60,
                "byte position of the bad frame"
            );
            assert!(reason.contains("checksum"), "{reason}");
        }
        Err(other) => panic!("expected Corrupt, got {other}"),
        Ok(_) => panic!("expected Corrupt, got an open log"),
    }
    // Nothing was cut from the damaged segment.
    assert_eq!(
        fs::metadata(&files[0]).expect("stat").len(),
        2 * (EMPTY_FRAME_BYTES + 60)
    );
    flip_byte(&files[0], 100); // repair

    let log = Log::open(dir.path(), small_segments()).expect("open repaired");
    assert_eq!(log.next_offset(), 6);
    drop(log);

    // A missing middle segment leaves a gap in offsets.
    fs::remove_file(&files[1]).expect("remove middle segment");
    match Log::open(dir.path(), small_segments()) {
        Err(LogError::Corrupt { path, .. }) => assert_eq!(path, files[2]),
        Err(other) => panic!("expected Corrupt, got {other}"),
        Ok(_) => panic!("expected Corrupt, got an open log"),
    }
}

#[test]
fn truncated_older_segment_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), small_segments()).expect("open");
    append_sixty_byte_records(&log, 4);
    drop(log);
    let files = segment_files(dir.path());
    let len = fs::metadata(&files[0]).expect("stat").len();
    OpenOptions::new()
        .write(true)
        .open(&files[0])
        .expect("open segment")
        .set_len(len - 1)
        .expect("truncate");
    let result = Log::open(dir.path(), small_segments());
    assert!(
        matches!(&result, Err(LogError::Corrupt { path, .. }) if *path == files[0]),
        "{:?}",
        result.err()
    );
}

#[test]
fn record_over_the_limit_is_rejected_and_the_log_stays_usable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        record_bytes_max: 1024,
        ..LogConfig::default()
    };
    let log = Log::open(dir.path(), config).expect("open");
    let big = NewRecord {
        payload: Bytes::from(vec![7; 1001]), // body = 24 + 1001 = 1025 bytes
        ..record(0, "")
    };
    let fits = NewRecord {
        payload: Bytes::from(vec![7; 1000]), // body = 1024 bytes, exactly the limit
        ..record(0, "")
    };
    match log.append(&[record(0, "small"), big.clone()]) {
        Err(LogError::RecordTooLarge { bytes, max }) => assert_eq!((bytes, max), (1025, 1024)),
        other => panic!("expected RecordTooLarge, got {other:?}"),
    }
    assert_eq!(log.next_offset(), 0, "nothing of the batch was appended");
    assert!(matches!(
        log.append_durable(&[big]),
        Err(LogError::RecordTooLarge {
            bytes: 1025,
            max: 1024
        })
    ));
    let long_name = NewRecord {
        headers: vec![("n".repeat(70_000), Bytes::new())],
        ..record(0, "")
    };
    let roomy = LogConfig {
        record_bytes_max: 1 << 20,
        ..config
    };
    drop(log);
    let log = Log::open(dir.path(), roomy).expect("reopen with larger records");
    assert!(matches!(
        log.append(&[long_name]),
        Err(LogError::RecordTooLarge {
            bytes: 70_000,
            max: 65_535
        })
    ));

    assert_eq!(
        log.append_durable(std::slice::from_ref(&fits))
            .expect("append"),
        0..1
    );
    assert_eq!(
        log.append_durable(&[record(1, "after")]).expect("append"),
        1..2
    );
    assert_eq!(
        read_all(&log),
        vec![stored(0, &fits), stored(1, &record(1, "after"))]
    );
}

#[test]
fn concurrent_append_durable_gets_distinct_contiguous_offsets() {
    const THREADS: usize = 8;
    const CALLS: usize = 40;
    let dir = tempfile::tempdir().expect("tempdir");
    // Small segments so that rolls race with appends and syncs too.
    let config = LogConfig {
        segment_bytes_max: 4096,
        ..LogConfig::default()
    };
    let log = Arc::new(Log::open(dir.path(), config).expect("open"));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for call in 0..CALLS {
                    let batch: Vec<NewRecord> = (0..1 + call % 3)
                        .map(|j| record(t as i64, &format!("t{t}-c{call}-r{j}")))
                        .collect();
                    let range = log.append_durable(&batch).expect("append_durable");
                    assert_eq!(range.end - range.start, batch.len() as u64);
                    acked.push((range, batch));
                }
                acked
            })
        })
        .collect();
    let mut acked: Vec<_> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("appender thread"))
        .collect();
    acked.sort_by_key(|(range, _)| range.start);
    let mut next = 0;
    for (range, _) in &acked {
        assert_eq!(range.start, next, "ranges are contiguous and disjoint");
        next = range.end;
    }
    let total: u64 = (0..CALLS).map(|c| (1 + c % 3) as u64).sum::<u64>() * THREADS as u64;
    assert_eq!(next, total);
    assert_eq!(log.next_offset(), total);
    assert!(log.segments().len() > 1, "the test rolled segments");
    drop(log);

    let log = Log::open(dir.path(), config).expect("reopen");
    let all = read_all(&log);
    assert_eq!(all.len() as u64, total);
    for (range, batch) in &acked {
        for (offset, new) in range.clone().zip(batch) {
            assert_eq!(all[offset as usize], stored(offset, new));
        }
    }
    let distinct: HashSet<&Bytes> = all.iter().map(|r| &r.payload).collect();
    assert_eq!(distinct.len() as u64, total);
}

#[test]
fn truncate_before_deletes_only_whole_old_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), small_segments()).expect("open");
    append_sixty_byte_records(&log, 9); // [0,2) [2,4) [4,6) [6,8) [8,9)
    assert_eq!(log.truncate_before(0).expect("truncate"), 0);
    assert_eq!(
        log.truncate_before(1).expect("truncate"),
        0,
        "segment [0,2) holds 1"
    );
    assert_eq!(log.start_offset(), 0);

    assert_eq!(log.truncate_before(3).expect("truncate"), 1);
    assert_eq!(log.start_offset(), 2);
    assert_eq!(segment_files(dir.path()).len(), 4);
    let read = log.read(0, usize::MAX, usize::MAX).expect("read");
    assert_eq!(
        read.first().map(|r| r.offset),
        Some(2),
        "reads start at start_offset"
    );
    assert_eq!(read.len(), 7);

    assert_eq!(log.truncate_before(u64::MAX).expect("truncate"), 3);
    assert_eq!(log.start_offset(), 8, "the active segment is never deleted");
    assert_eq!(log.truncate_before(u64::MAX).expect("truncate"), 0);
    assert_eq!(
        log.segments()
            .iter()
            .map(|s| (s.base_offset, s.next_offset))
            .collect::<Vec<_>>(),
        [(8, 9)]
    );
    drop(log);

    let log = Log::open(dir.path(), small_segments()).expect("reopen");
    assert_eq!((log.start_offset(), log.next_offset()), (8, 9));
    append_sixty_byte_records(&log, 3);
    assert_eq!(
        read_all(&log).iter().map(|r| r.offset).collect::<Vec<_>>(),
        [8, 9, 10, 11]
    );
}

#[test]
fn sync_to_is_idempotent_and_tolerates_ends_past_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), LogConfig::default()).expect("open");
    log.sync_to(0).expect("nothing to sync");
    assert_eq!(
        log.append(&[record(1, "a"), record(2, "b")])
            .expect("append"),
        0..2
    );
    log.sync_to(2).expect("sync");
    log.sync_to(1).expect("already covered");
    log.sync_to(100).expect("past the end");
    log.sync_all().expect("sync all");
    assert_eq!(log.next_offset(), 2);
}

#[test]
fn a_directory_is_opened_by_one_log_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::open(dir.path(), LogConfig::default()).expect("open");
    assert!(matches!(
        Log::open(dir.path(), LogConfig::default()),
        Err(LogError::Io { .. })
    ));
    drop(log);
    let log = Log::open(dir.path(), LogConfig::default()).expect("reopen after drop");
    assert_eq!(log.next_offset(), 0);
}
