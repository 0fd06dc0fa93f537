//! The built-in queue's topics and subscriptions (`weir::queue::{Topic, Subscription}`)
//! through their public API: concurrent publish and routing, stream subscriptions (order,
//! independence, commit and restart, seek, partition sharing), queue subscriptions (competing
//! consumers, lease expiry, nack and dead letters, ack errors, restart), limits, retention and
//! waiting for messages. Time for leases is driven through the `now_ms` arguments, never slept.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use weir::queue::topic::partition_for_key;
use weir::queue::{
    Delivery, Message, QueueError, StartPosition, Subscription, SubscriptionConfig,
    SubscriptionMode, Topic, TopicConfig,
};

const ACK_TIMEOUT_MS: u64 = 1_000;

fn topic_config(partitions: u32) -> TopicConfig {
    TopicConfig {
        partitions,
        ..TopicConfig::default()
    }
}

fn open_topic(dir: &Path, partitions: u32) -> Arc<Topic> {
    Arc::new(Topic::open(dir, topic_config(partitions)).expect("open topic"))
}

fn message(key: Option<&str>, payload: &str) -> Message {
    Message {
        key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        headers: Vec::new(),
    }
}

/// Publishes `n` keyless messages "m0".."m{n-1}", one call.
fn publish_numbered(topic: &Topic, n: usize) {
    let messages: Vec<Message> = (0..n).map(|i| message(None, &format!("m{i}"))).collect();
    topic.publish(&messages).expect("publish");
}

fn text(bytes: &Bytes) -> String {
    String::from_utf8(bytes.to_vec()).expect("utf-8 payload")
}

fn payloads(deliveries: &[Delivery]) -> BTreeSet<String> {
    deliveries.iter().map(|d| text(&d.payload)).collect()
}

fn stream_config(start: StartPosition) -> SubscriptionConfig {
    SubscriptionConfig {
        mode: SubscriptionMode::Stream,
        start,
        ack_timeout_ms: ACK_TIMEOUT_MS,
        max_deliveries: 5,
    }
}

fn queue_config(max_deliveries: u32) -> SubscriptionConfig {
    SubscriptionConfig {
        mode: SubscriptionMode::Queue,
        start: StartPosition::Earliest,
        ack_timeout_ms: ACK_TIMEOUT_MS,
        max_deliveries,
    }
}

fn lease(delivery: &Delivery) -> String {
    delivery
        .lease_id
        .clone()
        .expect("queue deliveries carry a lease")
}

/// Checks per-partition order: in each partition, offsets strictly increase.
fn assert_partition_order(deliveries: &[Delivery]) {
    let mut last: HashMap<u32, u64> = HashMap::new();
    for d in deliveries {
        if let Some(&prev) = last.get(&d.partition) {
            assert!(
                d.offset > prev,
                "partition {} went from {prev} to {}",
                d.partition,
                d.offset
            );
        }
        last.insert(d.partition, d.offset);
    }
}

/// Fetches until a fetch returns nothing.
fn drain(sub: &Subscription, consumer: &str, now_ms: i64) -> Vec<Delivery> {
    let mut all = Vec::new();
    loop {
        let batch = sub.fetch(consumer, 333, now_ms).expect("fetch");
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

#[test]
fn concurrent_keyed_publish_lands_once_in_contiguous_partitions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = open_topic(dir.path(), 4);
    const THREADS: usize = 4;
    const PER_THREAD: usize = 5_000;
    const BATCH: usize = 50;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let topic = Arc::clone(&topic);
            thread::spawn(move || {
                let mut published = Vec::new();
                for start in (0..PER_THREAD).step_by(BATCH) {
                    let batch: Vec<Message> = (start..start + BATCH)
                        .map(|i| message(Some(&format!("key-{}", i % 97)), &format!("{t}:{i}")))
                        .collect();
                    published.extend(topic.publish(&batch).expect("publish"));
                }
                published
            })
        })
        .collect();
    let mut published = HashSet::new();
    for handle in handles {
        for p in handle.join().expect("publisher thread") {
            assert!(
                published.insert((p.partition, p.offset)),
                "{p:?} returned twice"
            );
        }
    }
    assert_eq!(published.len(), THREADS * PER_THREAD);

    let mut seen = HashSet::new();
    let mut key_partition: HashMap<String, u32> = HashMap::new();
    for p in 0..4 {
        let end = topic.end_offset(p);
        let records = topic.read(p, 0, usize::MAX).expect("read");
        // One read may stop at its byte limit; read on until the end.
        let mut records = records;
        while records.last().map_or(0, |r| r.offset + 1) < end {
            let from = records.last().map_or(0, |r| r.offset + 1);
            records.extend(topic.read(p, from, usize::MAX).expect("read"));
        }
        let offsets: Vec<u64> = records.iter().map(|r| r.offset).collect();
        assert_eq!(
            offsets,
            (0..end).collect::<Vec<_>>(),
            "partition {p} offsets"
        );
        // Messages of one thread keep their order within a partition.
        let mut last_index: HashMap<String, usize> = HashMap::new();
        for r in &records {
            let payload = text(&r.payload);
            let (thread_id, index) = payload.split_once(':').expect("t:i payload");
            let index: usize = index.parse().expect("index");
            if let Some(&prev) = last_index.get(thread_id) {
                assert!(
                    index > prev,
                    "thread {thread_id} out of order in partition {p}"
                );
            }
            last_index.insert(thread_id.to_string(), index);
            assert!(seen.insert(payload.clone()), "{payload} stored twice");
            let key = text(r.key.as_ref().expect("keyed"));
            assert_eq!(partition_for_key(key.as_bytes(), 4), p);
            assert_eq!(*key_partition.entry(key).or_insert(p), p);
            assert!(published.contains(&(p, r.offset)));
        }
    }
    assert_eq!(seen.len(), THREADS * PER_THREAD);
    assert_eq!(key_partition.len(), 97);
    let stats = topic.stats();
    assert_eq!(stats.messages, (THREADS * PER_THREAD) as u64);
    assert_eq!(stats.oldest_offsets, vec![0; 4]);
    assert!(
        key_partition.values().collect::<BTreeSet<_>>().len() == 4,
        "97 keys use every partition"
    );

    // Without keys: round robin over all partitions.
    let before = topic.stats().next_offsets;
    let keyless: Vec<Message> = (0..8).map(|i| message(None, &format!("rr{i}"))).collect();
    let placed = topic.publish(&keyless).expect("publish");
    let partitions: BTreeSet<u32> = placed.iter().map(|p| p.partition).collect();
    assert_eq!(partitions, (0..4).collect());
    let after = topic.stats().next_offsets;
    for p in 0..4 {
        assert_eq!(after[p] - before[p], 2, "partition {p} got two of eight");
    }
}

#[test]
fn topic_config_is_persisted_and_wins_on_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let topic = Topic::open(dir.path(), topic_config(3)).expect("open");
        topic
            .set_retention(Some(60_000), None)
            .expect("set retention");
        publish_numbered(&topic, 5);
    }
    let topic = Topic::open(dir.path(), topic_config(8)).expect("reopen");
    assert_eq!(topic.partitions(), 3);
    assert_eq!(topic.config().retention_ms, Some(60_000));
    assert_eq!(topic.stats().messages, 5);
    let bad = Topic::open(&dir.path().join("other"), topic_config(0));
    assert!(matches!(bad, Err(QueueError::InvalidConfig(_))), "{bad:?}");
}

#[test]
fn stream_subscriptions_read_everything_in_order_independently() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = open_topic(&dir.path().join("t"), 3);
    publish_numbered(&topic, 300);
    let expected: BTreeSet<String> = (0..300).map(|i| format!("m{i}")).collect();
    for name in ["a", "b"] {
        let sub = Subscription::open(
            &dir.path().join(name),
            Arc::clone(&topic),
            stream_config(StartPosition::Earliest),
            None,
        )
        .expect("open subscription");
        let got = drain(&sub, "c1", 0);
        assert_eq!(
            got.len(),
            300,
            "subscription {name} reads each message once"
        );
        assert_eq!(payloads(&got), expected);
        assert_partition_order(&got);
        assert!(
            got.iter()
                .all(|d| d.lease_id.is_none() && d.delivery_count == 1)
        );
        // Partitions are interleaved, not read one after another.
        let first_three: BTreeSet<u32> = got[..3].iter().map(|d| d.partition).collect();
        assert_eq!(first_three.len(), 3);
        assert_eq!(
            sub.stats(0).lag,
            vec![100, 100, 100],
            "nothing committed yet"
        );
    }
}

#[test]
fn stream_commit_survives_reopen_and_uncommitted_is_redelivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (topic_dir, sub_dir) = (dir.path().join("t"), dir.path().join("s"));
    {
        let topic = open_topic(&topic_dir, 1);
        publish_numbered(&topic, 10);
        let sub = Subscription::open(
            &sub_dir,
            Arc::clone(&topic),
            stream_config(StartPosition::Earliest),
            None,
        )
        .expect("open");
        let first = sub.fetch("c", 4, 0).expect("fetch");
        assert_eq!(
            first.iter().map(|d| d.offset).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        assert_eq!(sub.commit("c").expect("commit"), vec![(0, 4)]);
        let uncommitted = sub.fetch("c", 3, 0).expect("fetch");
        assert_eq!(
            uncommitted.iter().map(|d| d.offset).collect::<Vec<_>>(),
            [4, 5, 6]
        );
        assert_eq!(sub.stats(0).lag, vec![6]);
        assert_eq!(sub.stats(0).in_flight, 3);
        // Dropped without any sync: a crash as far as the subscription is concerned.
    }
    let topic = open_topic(&topic_dir, 1);
    let sub = Subscription::open(
        &sub_dir,
        Arc::clone(&topic),
        stream_config(StartPosition::Latest),
        None,
    )
    .expect("reopen");
    let resumed = drain(&sub, "other-consumer", 0);
    assert_eq!(
        resumed.iter().map(|d| d.offset).collect::<Vec<_>>(),
        (4..10).collect::<Vec<_>>(),
        "resumes at the committed offset, redelivering 4..7"
    );
    assert_eq!(sub.commit("other-consumer").expect("commit"), vec![(0, 10)]);
    assert_eq!(sub.stats(0).lag, vec![0]);

    // Seek back to the start: everything is read again, and the seek is durable.
    sub.seek(StartPosition::Earliest).expect("seek");
    drop(sub);
    let sub = Subscription::open(
        &sub_dir,
        Arc::clone(&topic),
        stream_config(StartPosition::Latest),
        None,
    )
    .expect("reopen after seek");
    assert_eq!(drain(&sub, "c", 0).len(), 10);
    sub.seek(StartPosition::Offset(7)).expect("seek to offset");
    assert_eq!(
        drain(&sub, "c", 0)
            .iter()
            .map(|d| d.offset)
            .collect::<Vec<_>>(),
        [7, 8, 9]
    );
    sub.seek(StartPosition::Latest).expect("seek to latest");
    assert!(drain(&sub, "c", 0).is_empty());
    assert!(matches!(
        sub.ack(&["0-0-1".to_string()], 0),
        Err(QueueError::WrongMode { .. })
    ));
}

#[test]
fn stream_start_latest_and_timestamp_skip_older_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = open_topic(&dir.path().join("t"), 2);
    publish_numbered(&topic, 6);
    let latest = Subscription::open(
        &dir.path().join("latest"),
        Arc::clone(&topic),
        stream_config(StartPosition::Latest),
        None,
    )
    .expect("open");
    let future = Subscription::open(
        &dir.path().join("future"),
        Arc::clone(&topic),
        stream_config(StartPosition::Timestamp(i64::MAX)),
        None,
    )
    .expect("open");
    let past = Subscription::open(
        &dir.path().join("past"),
        Arc::clone(&topic),
        stream_config(StartPosition::Timestamp(0)),
        None,
    )
    .expect("open");
    assert!(latest.fetch("c", 100, 0).expect("fetch").is_empty());
    assert!(future.fetch("c", 100, 0).expect("fetch").is_empty());
    assert_eq!(past.fetch("c", 100, 0).expect("fetch").len(), 6);
    publish_numbered(&topic, 2);
    assert_eq!(
        payloads(&latest.fetch("c", 100, 0).expect("fetch")).len(),
        2
    );
    assert_eq!(future.fetch("c", 100, 0).expect("fetch").len(), 2);
}

#[test]
fn stream_consumers_in_one_subscription_get_disjoint_partitions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = open_topic(&dir.path().join("t"), 4);
    publish_numbered(&topic, 400);
    let sub = Subscription::open(
        &dir.path().join("s"),
        Arc::clone(&topic),
        stream_config(StartPosition::Earliest),
        None,
    )
    .expect("open");
    // Both join before reading (a fetch of 0 registers a consumer).
    assert!(sub.fetch("a", 0, 0).expect("join").is_empty());
    assert!(sub.fetch("b", 0, 0).expect("join").is_empty());
    let a = drain(&sub, "a", 10);
    let b = drain(&sub, "b", 10);
    let a_parts: BTreeSet<u32> = a.iter().map(|d| d.partition).collect();
    let b_parts: BTreeSet<u32> = b.iter().map(|d| d.partition).collect();
    assert_eq!(a_parts, BTreeSet::from([0, 2]));
    assert_eq!(b_parts, BTreeSet::from([1, 3]));
    assert_eq!(a.len() + b.len(), 400);
    assert_eq!(payloads(&a).union(&payloads(&b)).count(), 400);
    assert_eq!(sub.commit("a").expect("commit"), vec![(0, 100), (2, 100)]);

    // b goes silent past the timeout: a takes over b's partitions from their committed
    // offset (0, since b never committed), so b's messages come again.
    let later = 10 + ACK_TIMEOUT_MS as i64;
    let takeover = drain(&sub, "a", later);
    assert_eq!(takeover.len(), 200);
    assert_eq!(
        takeover
            .iter()
            .map(|d| d.partition)
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([1, 3])
    );
    assert_eq!(payloads(&takeover), payloads(&b));
    assert!(
        sub.commit("b").expect("commit").is_empty(),
        "b owns nothing"
    );
}

#[test]
fn queue_competing_consumers_share_messages_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = open_topic(&dir.path().join("t"), 4);
    const N: usize = 3_000;
    publish_numbered(&topic, N);
    let sub = Arc::new(
        Subscription::open(
            &dir.path().join("s"),
            Arc::clone(&topic),
            queue_config(5),
            None,
        )
        .expect("open"),
    );
    let handles: Vec<_> = (0..3)
        .map(|c| {
            let sub = Arc::clone(&sub);
            thread::spawn(move || {
                let consumer = format!("consumer-{c}");
                let mut got = Vec::new();
                loop {
                    let batch = sub.fetch(&consumer, 25, 0).expect("fetch");
                    if batch.is_empty() {
                        return got;
                    }
                    let leases: Vec<String> = batch.iter().map(lease).collect();
                    assert_eq!(sub.ack(&leases, 1).expect("ack"), batch.len());
                    got.extend(batch);
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut per_consumer = Vec::new();
    for handle in handles {
        let got = handle.join().expect("consumer thread");
        per_consumer.push(got.len());
        all.extend(got);
    }
    assert_eq!(all.len(), N, "no message delivered twice: {per_consumer:?}");
    let expected: BTreeSet<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(payloads(&all), expected);
    assert!(all.iter().all(|d| d.delivery_count == 1));
    let stats = sub.stats(2);
    assert_eq!(stats.lag, vec![0; 4]);
    assert_eq!(
        (stats.in_flight, stats.redeliveries, stats.dead_lettered),
        (0, 0, 0)
    );
    // Acked messages never come back, not even after the lease times pass.
    assert!(
        sub.fetch("late", 100, 10 * ACK_TIMEOUT_MS as i64)
            .expect("fetch")
            .is_empty()
    );
}

#[test]
fn queue_expired_lease_is_redelivered_and_late_ack_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = open_topic(&dir.path().join("t"), 1);
    let dlq = open_topic(&dir.path().join("t_dlq"), 1);
    publish_numbered(&topic, 2);
    let sub = Subscription::open(
        &dir.path().join("s"),
        Arc::clone(&topic),
        queue_config(2),
        Some(Arc::clone(&dlq)),
    )
    .expect("open");
    let first = sub.fetch("a", 2, 0).expect("fetch");
    assert_eq!(first.len(), 2);
    assert_eq!(sub.stats(0).in_flight, 2);
    // While leased, nobody else gets them.
    assert!(sub.fetch("b", 10, 999).expect("fetch").is_empty());
    sub.ack(&[lease(&first[1])], 999)
        .expect("ack within the timeout");

    let t1 = ACK_TIMEOUT_MS as i64;
    let err = sub.ack(&[lease(&first[0])], t1).expect_err("expired");
    assert!(
        matches!(&err, QueueError::LeaseExpired { lease_id } if *lease_id == lease(&first[0])),
        "{err:?}"
    );
    let again = sub.fetch("b", 10, t1).expect("fetch");
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].offset, again[0].delivery_count), (0, 2));
    assert_ne!(lease(&again[0]), lease(&first[0]));
    assert_eq!(sub.stats(t1).redeliveries, 1);
    // The superseded lease stays expired; the new one is the only live one.
    assert!(matches!(
        sub.ack(&[lease(&first[0])], t1),
        Err(QueueError::LeaseExpired { .. })
    ));

    // The second lease expires too: max_deliveries = 2, so it goes to the dead-letter topic.
    let t2 = 2 * t1;
    assert!(sub.fetch("b", 10, t2).expect("fetch").is_empty());
    let dead = dlq.read(0, 0, 10).expect("read dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!(text(&dead[0].payload), "m0");
    let header = |name: &str| {
        dead[0]
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| text(v))
    };
    assert_eq!(
        header("weir.dead_letter.reason").as_deref(),
        Some("lease expired 2 times")
    );
    assert_eq!(header("weir.dead_letter.partition").as_deref(), Some("0"));
    assert_eq!(header("weir.dead_letter.offset").as_deref(), Some("0"));
    assert_eq!(header("weir.dead_letter.topic").as_deref(), Some("t"));
    let stats = sub.stats(t2);
    assert_eq!(
        (stats.dead_lettered, stats.in_flight, stats.lag.clone()),
        (1, 0, vec![0])
    );
    assert!(
        sub.fetch("b", 10, 10 * t2).expect("fetch").is_empty(),
        "never again"
    );
}

#[test]
fn queue_nack_redelivers_then_dead_letters_with_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = Arc::new(
        Topic::open(&dir.path().join("t"), topic_config(2))
            .expect("open")
            .with_name("orders"),
    );
    let dlq = open_topic(&dir.path().join("orders_dlq"), 1);
    topic
        .publish(&[Message {
            key: Some(Bytes::from_static(b"k")),
            payload: Bytes::from_static(b"poison"),
            headers: vec![("origin".to_string(), Bytes::from_static(b"test"))],
        }])
        .expect("publish");
    let sub = Subscription::open(
        &dir.path().join("s"),
        Arc::clone(&topic),
        queue_config(5),
        Some(Arc::clone(&dlq)),
    )
    .expect("open");
    for attempt in 1..=5 {
        let batch = sub.fetch("c", 10, 0).expect("fetch");
        assert_eq!(batch.len(), 1, "attempt {attempt}");
        assert_eq!(batch[0].delivery_count, attempt);
        assert_eq!(sub.nack(&[lease(&batch[0])], 0).expect("nack"), 1);
    }
    assert!(
        sub.fetch("c", 10, 0).expect("fetch").is_empty(),
        "not redelivered"
    );
    let dead = dlq.read(0, 0, 10).expect("read dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!(text(&dead[0].payload), "poison");
    assert_eq!(dead[0].key.as_deref(), Some(&b"k"[..]));
    let headers: BTreeMap<String, String> = dead[0]
        .headers
        .iter()
        .map(|(n, v)| (n.clone(), text(v)))
        .collect();
    assert_eq!(headers["origin"], "test");
    assert_eq!(headers["weir.dead_letter.reason"], "nacked 5 times");
    assert_eq!(headers["weir.dead_letter.topic"], "orders");
    let stats = sub.stats(0);
    assert_eq!((stats.dead_lettered, stats.redeliveries), (1, 4));
    drop(sub);
    // Dead-lettering is durable: nothing comes back after a restart.
    let sub = Subscription::open(
        &dir.path().join("s"),
        Arc::clone(&topic),
        queue_config(5),
        None,
    )
    .expect("reopen");
    assert!(sub.fetch("c", 10, 0).expect("fetch").is_empty());
    assert_eq!(sub.stats(0).dead_lettered, 1);
    assert_eq!(dlq.end_offset(0), 1);
}

#[test]
fn queue_ack_errors_apply_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = open_topic(&dir.path().join("t"), 1);
    publish_numbered(&topic, 2);
    let sub = Subscription::open(
        &dir.path().join("s"),
        Arc::clone(&topic),
        queue_config(5),
        None,
    )
    .expect("open");
    let batch = sub.fetch("c", 2, 0).expect("fetch");
    let err = sub
        .ack(&[lease(&batch[0]), "no-such-lease".to_string()], 1)
        .expect_err("unknown lease");
    assert!(
        matches!(&err, QueueError::UnknownLease { lease_id } if lease_id == "no-such-lease"),
        "{err:?}"
    );
    // All or nothing: the valid lease in the failed call is still live.
    assert_eq!(
        sub.ack(&[lease(&batch[0]), lease(&batch[0])], 1)
            .expect("ack"),
        1
    );
    assert!(matches!(
        sub.ack(&[lease(&batch[0])], 1),
        Err(QueueError::UnknownLease { .. })
    ));
    assert!(matches!(
        sub.nack(&["0-1-7".to_string()], 1),
        Err(QueueError::UnknownLease { .. })
    ));
    assert!(matches!(sub.commit("c"), Err(QueueError::WrongMode { .. })));
    assert_eq!(sub.stats(1).lag, vec![1]);
}

#[test]
fn queue_reopen_redelivers_exactly_the_unacked_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (topic_dir, sub_dir) = (dir.path().join("t"), dir.path().join("s"));
    let old_leases: Vec<String>;
    {
        let topic = open_topic(&topic_dir, 2);
        publish_numbered(&topic, 10);
        let sub =
            Subscription::open(&sub_dir, Arc::clone(&topic), queue_config(5), None).expect("open");
        let batch = sub.fetch("c", 10, 0).expect("fetch");
        assert_eq!(batch.len(), 10);
        old_leases = batch.iter().map(lease).collect();
        let acked: Vec<String> = batch
            .iter()
            .filter(|d| ["m0", "m3", "m4", "m9"].contains(&text(&d.payload).as_str()))
            .map(lease)
            .collect();
        assert_eq!(sub.ack(&acked, 1).expect("ack"), 4);
        // One more delivery of m1 before the crash, so its count is 2 on disk.
        let m1 = batch.iter().find(|d| text(&d.payload) == "m1").expect("m1");
        sub.nack(&[lease(m1)], 1).expect("nack");
        let again = sub.fetch("c", 1, 2).expect("fetch");
        assert_eq!(
            (text(&again[0].payload).as_str(), again[0].delivery_count),
            ("m1", 2)
        );
    }
    let topic = open_topic(&topic_dir, 2);
    let sub =
        Subscription::open(&sub_dir, Arc::clone(&topic), queue_config(5), None).expect("reopen");
    // Leases are gone with the process, but not their message's delivery counts; the time
    // has not even passed the old leases' expiry.
    let back = sub.fetch("c", 100, 3).expect("fetch");
    let counts: BTreeMap<String, u32> = back
        .iter()
        .map(|d| (text(&d.payload), d.delivery_count))
        .collect();
    assert_eq!(
        counts,
        BTreeMap::from([
            ("m1".to_string(), 3),
            ("m2".to_string(), 2),
            ("m5".to_string(), 2),
            ("m6".to_string(), 2),
            ("m7".to_string(), 2),
            ("m8".to_string(), 2),
        ])
    );
    // An old lease of an unacked message has expired; one of an acked message is unknown.
    let old_unacked = old_leases.iter().find(|l| {
        back.iter()
            .any(|d| l.starts_with(&format!("{}-{}-", d.partition, d.offset)))
    });
    assert!(matches!(
        sub.ack(&[old_unacked.expect("an old lease").clone()], 3),
        Err(QueueError::LeaseExpired { .. })
    ));
    let leases: Vec<String> = back.iter().map(lease).collect();
    assert_eq!(sub.ack(&leases, 3).expect("ack"), 6);
    drop(sub);
    let sub =
        Subscription::open(&sub_dir, Arc::clone(&topic), queue_config(5), None).expect("reopen");
    assert!(sub.fetch("c", 100, 4).expect("fetch").is_empty());
    assert_eq!(sub.stats(4).lag, vec![0, 0]);
    // Reopening in the other mode is refused rather than misreading the state.
    drop(sub);
    let wrong = Subscription::open(
        &sub_dir,
        topic,
        stream_config(StartPosition::Earliest),
        None,
    );
    assert!(
        matches!(wrong, Err(QueueError::InvalidConfig(_))),
        "{wrong:?}"
    );
}

#[test]
fn queue_state_survives_snapshots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (topic_dir, sub_dir) = (dir.path().join("t"), dir.path().join("s"));
    let topic = open_topic(&topic_dir, 2);
    const N: usize = 1_200;
    publish_numbered(&topic, N);
    let sub =
        Subscription::open(&sub_dir, Arc::clone(&topic), queue_config(5), None).expect("open");
    // One event per fetch and per ack: more than one snapshot's worth (1024 events).
    let mut kept = Vec::new();
    for round in 0..(N / 2) {
        let batch = sub.fetch("c", 2, 0).expect("fetch");
        assert_eq!(batch.len(), 2, "round {round}");
        sub.ack(&[lease(&batch[0])], 0).expect("ack");
        kept.push(text(&batch[1].payload));
    }
    drop(sub);
    let sub =
        Subscription::open(&sub_dir, Arc::clone(&topic), queue_config(5), None).expect("reopen");
    let back = drain(&sub, "c", 0);
    assert_eq!(
        payloads(&back),
        kept.iter().cloned().collect::<BTreeSet<_>>(),
        "exactly the unacked half comes back"
    );
    assert_eq!(back.len(), N / 2);
    assert!(back.iter().all(|d| d.delivery_count == 2));
    assert_eq!(sub.stats(0).redeliveries, (N / 2) as u64);
}

#[test]
fn oversized_message_rejects_the_whole_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = Topic::open(
        dir.path(),
        TopicConfig {
            partitions: 2,
            message_bytes_max: 100,
            ..TopicConfig::default()
        },
    )
    .expect("open");
    let batch = vec![
        message(None, "small"),
        message(Some("kk"), &"x".repeat(99)), // key + payload = 101 bytes
        message(None, "small"),
    ];
    let err = topic.publish(&batch).expect_err("too large");
    assert!(
        matches!(
            err,
            QueueError::MessageTooLarge {
                bytes: 101,
                max: 100
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        topic.stats().messages,
        0,
        "nothing of the batch was published"
    );
    let fits = vec![message(Some("kk"), &"x".repeat(98))];
    assert_eq!(topic.publish(&fits).expect("publish").len(), 1);
}

#[test]
fn retention_deletes_old_segments_and_readers_skip_to_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = Arc::new(
        Topic::open(
            &dir.path().join("t"),
            TopicConfig {
                partitions: 1,
                segment_bytes_max: 1_000,
                ..TopicConfig::default()
            },
        )
        .expect("open"),
    );
    let stream = Subscription::open(
        &dir.path().join("s"),
        Arc::clone(&topic),
        stream_config(StartPosition::Earliest),
        None,
    )
    .expect("open");
    for i in 0..100 {
        topic
            .publish(&[message(None, &format!("{i:0>100}"))])
            .expect("publish");
    }
    let before = topic.stats();
    assert!(before.bytes > 10_000, "{before:?}");
    assert_eq!(
        topic
            .apply_retention(i64::MAX)
            .expect("no policy, nothing deleted"),
        0
    );

    topic
        .set_retention(None, Some(3_000))
        .expect("set retention");
    let deleted = topic.apply_retention(0).expect("retention");
    assert!(deleted >= 7, "deleted {deleted}");
    let after = topic.stats();
    assert!(after.bytes <= 3_000 + 1_000, "{after:?}");
    assert!(after.oldest_offsets[0] > 0);
    assert_eq!(after.next_offsets[0], 100);
    assert_eq!(after.messages, 100 - after.oldest_offsets[0]);
    let first = topic.read(0, 0, 1).expect("read");
    assert_eq!(first[0].offset, after.oldest_offsets[0]);
    // The subscription never committed: it continues from what is left.
    let got = drain(&stream, "c", 0);
    assert_eq!(got.len() as u64, after.messages);
    assert_eq!(got[0].offset, after.oldest_offsets[0]);

    // Age: every closed segment's newest message is older than the cutoff; the active one stays.
    topic
        .set_retention(Some(1_000), None)
        .expect("set retention");
    assert_eq!(
        topic.apply_retention(0).expect("retention"),
        0,
        "nothing is that old"
    );
    assert!(topic.apply_retention(i64::MAX).expect("retention") >= 1);
    let aged = topic.stats();
    assert!(aged.bytes <= 1_000, "{aged:?}");
    assert_eq!(aged.next_offsets[0], 100);
    assert!(aged.messages >= 1);
}

#[tokio::test]
async fn wait_for_messages_wakes_on_publish_and_returns_at_the_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = open_topic(dir.path(), 2);
    let seen = topic.stats().next_offsets;

    // Nothing arrives: returns at the deadline, not before.
    let start = tokio::time::Instant::now();
    let deadline = start + Duration::from_millis(50);
    topic.wait_for_messages(&seen, deadline).await;
    assert!(tokio::time::Instant::now() >= deadline);
    assert_eq!(topic.stats().next_offsets, seen);

    // A publish from another task wakes a waiter that is already waiting.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut waiter = std::pin::pin!(topic.wait_for_messages(&seen, deadline));
    assert!(
        futures::poll!(waiter.as_mut()).is_pending(),
        "nothing published yet"
    );
    let publisher = {
        let topic = Arc::clone(&topic);
        tokio::task::spawn_blocking(move || topic.publish(&[message(Some("k"), "hello")]))
    };
    let placed = publisher.await.expect("publisher task").expect("publish");
    waiter.await;
    assert!(
        tokio::time::Instant::now() < deadline,
        "woken by the publish, not the deadline"
    );
    let p = placed[0].partition;
    assert_eq!(topic.end_offset(p), seen[p as usize] + 1);

    // Already past `seen`: returns at once.
    let far = tokio::time::Instant::now() + Duration::from_secs(30);
    topic.wait_for_messages(&seen, far).await;
    assert!(tokio::time::Instant::now() < far);
}
