//! The built-in queue through SQL: topics, publish with INSERT, stream and
//! queue subscriptions with FETCH / COMMIT / ACK / NACK / SEEK, dead letters,
//! errors, and durability across a restart of the real binary.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use tokio_postgres::Client;

use crate::harness::{BinaryServer, TestServer, expect_sqlstate, simple_rows, simple_value};

/// One fetched message: (partition, offset, key, payload, delivery_count, lease_id).
type Fetched = (i64, i64, Option<String>, String, i64, Option<String>);

async fn fetch(client: &Client, sql: &str) -> Vec<Fetched> {
    simple_rows(client, sql)
        .await
        .into_iter()
        .map(|r| {
            let num =
                |i: usize| -> i64 { r[i].as_deref().expect("not null").parse().expect("number") };
            (
                num(1),
                num(2),
                r[3].clone(),
                r[4].clone().expect("payload"),
                num(6),
                r[7].clone(),
            )
        })
        .collect()
}

async fn publish(client: &Client, topic: &str, from: usize, to: usize) {
    let values: Vec<String> = (from..to)
        .map(|i| format!("('k{}', 'm{i}')", i % 17))
        .collect();
    client
        .batch_execute(&format!(
            "INSERT INTO {topic} (key, payload) VALUES {}",
            values.join(", ")
        ))
        .await
        .expect("publish");
}

#[tokio::test]
async fn stream_subscriptions_each_read_everything_in_partition_order() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute("CREATE TOPIC orders WITH (partitions = 4)")
        .await
        .expect("create topic");
    publish(&client, "orders", 0, 500).await;
    assert_eq!(
        simple_value(&client, "SELECT count(*) FROM orders").await,
        "500"
    );
    let topics = simple_rows(&client, "SHOW TOPICS").await;
    assert_eq!(topics[0][0].as_deref(), Some("orders"));
    assert_eq!(topics[0][1].as_deref(), Some("4"));
    assert_eq!(topics[0][2].as_deref(), Some("500"));
    // Same key → same partition.
    let spread = simple_rows(
        &client,
        "SELECT key, count(DISTINCT _partition) FROM orders GROUP BY key HAVING count(DISTINCT _partition) > 1",
    )
    .await;
    assert!(
        spread.is_empty(),
        "a key landed in two partitions: {spread:?}"
    );

    for name in ["audit", "billing"] {
        client
            .batch_execute(&format!(
                "CREATE SUBSCRIPTION {name} ON TOPIC orders WITH (mode = 'stream')"
            ))
            .await
            .expect("create subscription");
        let mut seen: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        let mut payloads = BTreeSet::new();
        loop {
            let batch = fetch(&client, &format!("FETCH 64 FROM SUBSCRIPTION {name}")).await;
            if batch.is_empty() {
                break;
            }
            for (partition, offset, _, payload, _, lease) in batch {
                assert!(lease.is_none(), "stream mode has no leases");
                seen.entry(partition).or_default().push(offset);
                payloads.insert(payload);
            }
        }
        assert_eq!(payloads.len(), 500, "{name} read every message once");
        for (partition, offsets) in &seen {
            let expected: Vec<i64> = (0..offsets.len() as i64).collect();
            assert_eq!(offsets, &expected, "partition {partition} in offset order");
        }
        client
            .batch_execute(&format!("COMMIT SUBSCRIPTION {name}"))
            .await
            .expect("commit");
    }
    let lag = simple_rows(&client, "SHOW SUBSCRIPTIONS").await;
    assert!(lag.iter().all(|r| r[2].as_deref() == Some("0")), "{lag:?}");

    // Seeking back replays.
    client
        .batch_execute("SEEK SUBSCRIPTION audit TO EARLIEST")
        .await
        .expect("seek");
    assert_eq!(
        fetch(&client, "FETCH 10 FROM SUBSCRIPTION audit")
            .await
            .len(),
        10
    );
    server.shutdown().await;
}

#[tokio::test]
async fn queue_subscription_leases_each_message_to_one_consumer() {
    let server = TestServer::start().await;
    let admin = server.connect().await;
    admin
        .batch_execute(
            "CREATE TOPIC jobs WITH (partitions = 2);
             CREATE SUBSCRIPTION workers ON TOPIC jobs WITH (mode = 'queue', ack_timeout = '60s')",
        )
        .await
        .expect("setup");
    publish(&admin, "jobs", 0, 300).await;
    let mut consumers = Vec::new();
    for _ in 0..3 {
        let client = server.connect().await;
        consumers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let batch = fetch(&client, "FETCH 7 FROM SUBSCRIPTION workers").await;
                if batch.is_empty() {
                    break;
                }
                let leases: Vec<String> = batch
                    .iter()
                    .map(|m| format!("'{}'", m.5.clone().expect("queue mode has leases")))
                    .collect();
                client
                    .batch_execute(&format!("ACK SUBSCRIPTION workers {}", leases.join(", ")))
                    .await
                    .expect("ack");
                got.extend(batch.into_iter().map(|m| m.3));
            }
            got
        }));
    }
    let mut all = Vec::new();
    for c in consumers {
        all.extend(c.await.expect("consumer task"));
    }
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), 300, "every message delivered exactly once");
    assert_eq!(unique.len(), 300);
    server.shutdown().await;
}

#[tokio::test]
async fn unacked_leases_come_back_and_nacks_dead_letter() {
    let server = TestServer::start().await;
    let a = server.connect().await;
    let b = server.connect().await;
    a.batch_execute(
        "CREATE TOPIC tasks;
         CREATE SUBSCRIPTION slow ON TOPIC tasks WITH (mode = 'queue', ack_timeout = '1s', max_deliveries = 3)",
    )
    .await
    .expect("setup");
    publish(&a, "tasks", 0, 2).await;
    let first = fetch(&a, "FETCH 1 FROM SUBSCRIPTION slow").await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].4, 1);
    // Not acked: after the lease expires another consumer gets it again.
    let mut again = Vec::new();
    for _ in 0..10 {
        again = fetch(&b, "FETCH 2 FROM SUBSCRIPTION slow WAIT '5s'").await;
        if again.iter().any(|m| m.3 == first[0].3) {
            break;
        }
    }
    let redelivered = again
        .iter()
        .find(|m| m.3 == first[0].3)
        .expect("redelivered");
    assert_eq!(redelivered.4, 2, "delivery_count counts the redelivery");
    // Acking the expired lease is an error, not a silent success.
    let state = expect_sqlstate(
        &a,
        &format!(
            "ACK SUBSCRIPTION slow '{}'",
            first[0].5.clone().expect("lease")
        ),
    )
    .await;
    assert_eq!(state, "55000");
    assert_eq!(
        expect_sqlstate(&a, "ACK SUBSCRIPTION slow 'no-such-lease'").await,
        "42704"
    );

    // NACK until max_deliveries: the message moves to the dead-letter topic.
    let victim = redelivered.3.clone();
    let mut lease = redelivered.5.clone().expect("lease");
    for _ in 0..3 {
        b.batch_execute(&format!("NACK SUBSCRIPTION slow '{lease}'"))
            .await
            .expect("nack");
        let next = fetch(&b, "FETCH 2 FROM SUBSCRIPTION slow").await;
        match next.into_iter().find(|m| m.3 == victim) {
            Some(m) => lease = m.5.expect("lease"),
            None => break,
        }
    }
    let dead = simple_rows(&b, "SELECT payload, headers FROM tasks_dlq").await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0][0].as_deref(), Some(victim.as_str()));
    assert!(
        dead[0][1].as_deref().unwrap_or("").contains("reason"),
        "{dead:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn queue_statements_reject_bad_input() {
    let server = TestServer::start().await;
    let c = server.connect().await;
    assert_eq!(
        expect_sqlstate(&c, "FETCH 1 FROM SUBSCRIPTION nope").await,
        "42704"
    );
    assert_eq!(
        expect_sqlstate(&c, "CREATE SUBSCRIPTION s ON TOPIC nope").await,
        "42704"
    );
    assert_eq!(
        expect_sqlstate(&c, "CREATE TOPIC t WITH (partitions = 0)").await,
        "22023"
    );
    assert_eq!(
        expect_sqlstate(&c, "CREATE TOPIC t WITH (colour = 'red')").await,
        "22023"
    );
    assert_eq!(
        expect_sqlstate(&c, "CREATE TOPIC t WITH (partitions = ").await,
        "42601"
    );
    c.batch_execute("CREATE TOPIC t; CREATE SUBSCRIPTION s ON TOPIC t")
        .await
        .expect("setup");
    assert_eq!(expect_sqlstate(&c, "CREATE TOPIC t").await, "42P07");
    assert_eq!(expect_sqlstate(&c, "DROP TOPIC t").await, "2BP01");
    assert_eq!(expect_sqlstate(&c, "ACK SUBSCRIPTION s 'x'").await, "55000");
    assert_eq!(
        expect_sqlstate(
            &c,
            "INSERT INTO t (key, payload, headers) VALUES ('k', 'p', 'not json')"
        )
        .await,
        "22P02"
    );
    // The session still works.
    assert_eq!(simple_value(&c, "SELECT count(*) FROM t").await, "0");
    server.shutdown().await;
}

#[tokio::test]
async fn subscriptions_resume_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("weir.log");
    let data = dir.path().join("data");
    let server = BinaryServer::start(&data, &log).await;
    let c = server.connect().await;
    c.batch_execute(
        "CREATE TOPIC events WITH (partitions = 2);
         CREATE SUBSCRIPTION reader ON TOPIC events;
         CREATE SUBSCRIPTION work ON TOPIC events WITH (mode = 'queue')",
    )
    .await
    .expect("setup");
    publish(&c, "events", 0, 40).await;
    let read = fetch(&c, "FETCH 10 FROM SUBSCRIPTION reader").await;
    assert_eq!(read.len(), 10);
    c.batch_execute("COMMIT SUBSCRIPTION reader")
        .await
        .expect("commit");
    let uncommitted = fetch(&c, "FETCH 5 FROM SUBSCRIPTION reader").await;
    assert_eq!(uncommitted.len(), 5);
    let leased = fetch(&c, "FETCH 30 FROM SUBSCRIPTION work").await;
    let acked: Vec<String> = leased[..20]
        .iter()
        .map(|m| format!("'{}'", m.5.clone().expect("lease")))
        .collect();
    c.batch_execute(&format!("ACK SUBSCRIPTION work {}", acked.join(", ")))
        .await
        .expect("ack");
    drop(c);
    server.kill9().await;

    let server = BinaryServer::start(&data, &log).await;
    let c = server.connect().await;
    let mut rest = Vec::new();
    loop {
        let batch = fetch(&c, "FETCH 100 FROM SUBSCRIPTION reader").await;
        if batch.is_empty() {
            break;
        }
        rest.extend(batch);
    }
    assert_eq!(
        rest.len(),
        30,
        "resumes at the committed offset: the 5 uncommitted come again"
    );
    let first_read: HashSet<String> = read.iter().map(|m| m.3.clone()).collect();
    assert!(
        rest.iter().all(|m| !first_read.contains(&m.3)),
        "committed messages not redelivered"
    );
    let mut redelivered = Vec::new();
    loop {
        let batch = fetch(&c, "FETCH 100 FROM SUBSCRIPTION work").await;
        if batch.is_empty() {
            break;
        }
        redelivered.extend(batch.into_iter().map(|m| m.3));
    }
    let acked_payloads: HashSet<String> = leased[..20].iter().map(|m| m.3.clone()).collect();
    assert_eq!(
        redelivered.len(),
        20,
        "exactly the 20 unacked messages come back"
    );
    assert!(redelivered.iter().all(|p| !acked_payloads.contains(p)));
    let stop = server.stop().await;
    assert!(stop.success());
}

#[tokio::test]
async fn copy_publishes_and_system_tables_report() {
    use futures::SinkExt;

    let server = TestServer::start().await;
    let c = server.connect().await;
    c.batch_execute(
        "CREATE TOPIC lines WITH (partitions = 2);
         CREATE SUBSCRIPTION follow ON TOPIC lines",
    )
    .await
    .expect("setup");
    // One message per line (the payload); with a column list, key and payload.
    let sink = c.copy_in("COPY lines FROM STDIN").await.expect("copy in");
    let mut sink = Box::pin(sink);
    sink.send(bytes::Bytes::from_static(
        b"{\"n\":1}\n{\"n\":2}\nplain text\n",
    ))
    .await
    .expect("send copy data");
    assert_eq!(sink.as_mut().finish().await.expect("finish copy"), 3);
    let sink = c
        .copy_in("COPY lines (key, payload) FROM STDIN")
        .await
        .expect("copy in");
    let mut sink = Box::pin(sink);
    sink.send(bytes::Bytes::from_static(b"k1\tfirst\nk1\tsecond\n"))
        .await
        .expect("send copy data");
    assert_eq!(sink.as_mut().finish().await.expect("finish copy"), 2);
    assert_eq!(
        simple_value(
            &c,
            "SELECT count(DISTINCT _partition) FROM lines WHERE key = 'k1'"
        )
        .await,
        "1"
    );
    assert_eq!(
        simple_value(&c, "SELECT payload FROM lines WHERE payload LIKE 'plain%'").await,
        "plain text"
    );

    let topics = simple_rows(
        &c,
        "SELECT topic, partition, messages FROM weir_topics ORDER BY partition",
    )
    .await;
    assert_eq!(topics.len(), 2);
    let total: i64 = topics
        .iter()
        .map(|r| r[2].as_deref().unwrap_or("0").parse::<i64>().expect("n"))
        .sum();
    assert_eq!(total, 5);
    let lag: i64 = simple_value(
        &c,
        "SELECT sum(lag) FROM weir_subscriptions WHERE subscription = 'follow'",
    )
    .await
    .parse()
    .expect("lag");
    assert_eq!(lag, 5, "nothing consumed yet");
    fetch(&c, "FETCH 100 FROM SUBSCRIPTION follow").await;
    c.batch_execute("COMMIT SUBSCRIPTION follow")
        .await
        .expect("commit");
    assert_eq!(
        simple_value(
            &c,
            "SELECT sum(lag) FROM weir_subscriptions WHERE subscription = 'follow'"
        )
        .await,
        "0"
    );
    let (status, metrics) = crate::harness::http_get(server.http_addr(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("weir_topic_messages{topic=\"lines\",partition=\"0\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weir_subscription_lag{subscription=\"follow\",partition=\"1\"} 0"),
        "{metrics}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn prepared_publish_binds_parameters() {
    let server = TestServer::start().await;
    let c = server.connect().await;
    c.batch_execute("CREATE TOPIC p WITH (partitions = 2)")
        .await
        .expect("create topic");
    let publish = c
        .prepare("INSERT INTO p (key, payload, headers) VALUES ($1, $2, $3)")
        .await
        .expect("prepare");
    for i in 0..20 {
        let key = (i % 2 == 0).then(|| format!("k{i}"));
        let n = c
            .execute(&publish, &[&key, &format!("m{i}"), &Some(r#"{"n": "1"}"#)])
            .await
            .expect("publish");
        assert_eq!(n, 1);
    }
    let null_payload = c
        .execute(&publish, &[&"k", &None::<String>, &None::<String>])
        .await;
    let err = null_payload.expect_err("a message needs a payload");
    assert_eq!(crate::harness::sqlstate(&err), "23502");
    assert_eq!(simple_value(&c, "SELECT count(*) FROM p").await, "20");
    assert_eq!(
        simple_value(&c, "SELECT count(*) FROM p WHERE key IS NULL").await,
        "10"
    );
    assert_eq!(
        simple_value(&c, "SELECT count(*) FROM p WHERE headers = '{\"n\":\"1\"}'").await,
        "20"
    );
    server.shutdown().await;
}
