//! `cargo bench --bench queue -- [flags]`: durable publish throughput and latency of Weir's
//! built-in queue (over HTTP and over pgwire) against RabbitMQ, and optionally Weir's
//! publish → fetch latency. Method and results: `docs/benchmarks.md`.
//!
//! Every producer is synchronous: it sends one message, waits for the acknowledgement that
//! the message is durable (Weir: the HTTP 200 or the `INSERT` completion, both after fsync;
//! RabbitMQ: the publisher confirm of a persistent message on a durable classic queue), and
//! only then sends the next. Throughput comes from running several producers at once.
//!
//! The bench starts its own `weir serve` on a temporary data directory under `/var/tmp`
//! (the same disk as RabbitMQ's `/var/lib/rabbitmq` here) and kills it at the end. It
//! prints a Markdown table on stdout, progress on stderr, and writes nothing into the
//! repository. It must never leave a server or a RabbitMQ queue behind: the server is
//! killed on drop, the queue is deleted at the end.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;

/// How long one publish may take before the run is declared broken.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the server's `listening` line or a broker's connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages each producer sends before the timed window, so connections, prepared
/// statements and server caches are warm.
const WARMUP_MESSAGES: usize = 20;
const DEFAULT_AMQP_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Where the Weir data directory goes: a real disk (not tmpfs), like /var/lib/rabbitmq.
const DATA_PARENT: &str = "/var/tmp";

const USAGE: &str = "\
usage: cargo bench --bench queue -- [--seconds S] [--runs N] [--sizes 100,1024]
                                    [--producers 1,8] [--systems http,pg,rabbitmq]
                                    [--e2e | --no-e2e]
  --seconds S     length of one timed run (default 5)
  --runs N        runs per configuration; the median by throughput is reported (default 3)
  --sizes LIST    message payload sizes in bytes (default 100,1024)
  --producers L   numbers of concurrent synchronous producers (default 1,8)
  --systems L     any of http (Weir over HTTP), pg (Weir over pgwire), rabbitmq
  --no-e2e        skip Weir's publish -> fetch latency table
environment:
  WEIR_BENCH_AMQP       RabbitMQ URI (default amqp://guest:guest@127.0.0.1:5672/%2f)
  WEIR_REQUIRE_BROKERS  =1: fail instead of skipping RabbitMQ when it does not answer";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    WeirHttp,
    WeirPg,
    RabbitMq,
}

impl System {
    fn label(self) -> &'static str {
        match self {
            System::WeirHttp => "Weir, HTTP",
            System::WeirPg => "Weir, pgwire",
            System::RabbitMq => "RabbitMQ",
        }
    }

    fn parse(s: &str) -> Result<System> {
        match s {
            "http" | "weir-http" => Ok(System::WeirHttp),
            "pg" | "pgwire" | "weir-pg" => Ok(System::WeirPg),
            "rabbitmq" | "rabbit" | "amqp" => Ok(System::RabbitMq),
            other => bail!("unknown system {other:?}; valid: http, pg, rabbitmq"),
        }
    }
}

struct Options {
    run_length: Duration,
    runs: usize,
    sizes: Vec<usize>,
    producers: Vec<usize>,
    systems: Vec<System>,
    e2e: bool,
}

fn parse_list<T>(value: &str, parse: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    value.split(',').map(|s| parse(s.trim())).collect()
}

fn parse_options() -> Result<Options> {
    let mut options = Options {
        run_length: Duration::from_secs(5),
        runs: 3,
        sizes: vec![100, 1024],
        producers: vec![1, 8],
        systems: vec![System::WeirHttp, System::WeirPg, System::RabbitMq],
        e2e: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| anyhow!("{name} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            // `cargo bench` passes --bench to every bench binary.
            "--bench" => {}
            "--seconds" => {
                let s: f64 = value("--seconds")?.parse().context("--seconds")?;
                if !(s > 0.0 && s <= 3600.0) {
                    bail!("--seconds must be in (0, 3600]");
                }
                options.run_length = Duration::from_secs_f64(s);
            }
            "--runs" => {
                options.runs = value("--runs")?.parse().context("--runs")?;
                if options.runs == 0 {
                    bail!("--runs must be at least 1");
                }
            }
            "--sizes" => {
                options.sizes = parse_list(&value("--sizes")?, |s| {
                    let n: usize = s.parse().context("--sizes")?;
                    if n == 0 || n > 1 << 20 {
                        bail!("sizes must be in 1..=1048576 bytes");
                    }
                    Ok(n)
                })?;
            }
            "--producers" => {
                options.producers = parse_list(&value("--producers")?, |s| {
                    let n: usize = s.parse().context("--producers")?;
                    if n == 0 || n > 1024 {
                        bail!("producers must be in 1..=1024");
                    }
                    Ok(n)
                })?;
            }
            "--systems" => options.systems = parse_list(&value("--systems")?, System::parse)?,
            "--e2e" => options.e2e = true,
            "--no-e2e" => options.e2e = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(options)
}

/// A payload of `size` printable bytes without a newline (over HTTP text/plain a newline
/// would split it into two messages).
fn payload(size: usize) -> Bytes {
    let pattern = b"weir-queue-benchmark-0123456789abcdefghijklmnopqrstuvwxyz.";
    Bytes::from(
        pattern
            .iter()
            .copied()
            .cycle()
            .take(size)
            .collect::<Vec<u8>>(),
    )
}

// ---------------------------------------------------------------------------------------
// The systems under test
// ---------------------------------------------------------------------------------------

/// `weir serve` as a child process on a temporary data directory.
struct WeirServer {
    /// Killed on drop, so an early error never leaves a server behind.
    child: Child,
    pg_addr: SocketAddr,
    http_addr: SocketAddr,
    topic: String,
    /// Removed on drop, after the child is killed (fields drop in order).
    data_dir: tempfile::TempDir,
}

impl WeirServer {
    async fn start() -> Result<WeirServer> {
        let data_dir = tempfile::Builder::new()
            .prefix("weir-bench-")
            .tempdir_in(DATA_PARENT)
            .with_context(|| format!("create a data directory under {DATA_PARENT}"))?;
        let log_path = data_dir.path().join("server.log");
        let log = std::fs::File::create(&log_path).context("create the server log")?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir.path().join("data"))
            .args(["--pg-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("spawn the weir binary")?;
        let stdout = child
            .stdout
            .take()
            .context("the server's stdout is piped")?;
        let mut lines = BufReader::new(stdout).lines();
        let listening = tokio::time::timeout(CONNECT_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if line.starts_with("weir: listening") {
                    return Ok(line);
                }
            }
            Err(anyhow!(
                "weir exited before listening; its log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            ))
        })
        .await
        .context("waiting for `weir: listening`")??;
        // Keep reading stdout so the server never blocks on a full pipe; ends at its exit.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let addr = |name: &str| -> Result<SocketAddr> {
            listening
                .split_whitespace()
                .find_map(|word| word.strip_prefix(name))
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| anyhow!("no {name}ADDR in {listening:?}"))
        };
        let server = WeirServer {
            child,
            pg_addr: addr("pg=")?,
            http_addr: addr("http=")?,
            topic: format!("bench_{:08x}", rand::random::<u32>()),
            data_dir,
        };
        let client = server.sql().await?;
        client
            .batch_execute(&format!(
                "CREATE TOPIC {} WITH (partitions = 4)",
                server.topic
            ))
            .await
            .context("create the benchmark topic")?;
        Ok(server)
    }

    async fn sql(&self) -> Result<tokio_postgres::Client> {
        let config = format!(
            "host={} port={} user=postgres dbname=weir",
            self.pg_addr.ip(),
            self.pg_addr.port()
        );
        let (client, connection) = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio_postgres::connect(&config, tokio_postgres::NoTls),
        )
        .await
        .context("connecting to weir over pgwire")??;
        // Ends when the client is dropped.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("pgwire connection: {e}");
            }
        });
        Ok(client)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.path().join("server.log")).unwrap_or_default()
    }

    async fn stop(mut self) -> Result<()> {
        self.child.kill().await.context("kill the weir server")?;
        let log = self.log();
        if log.contains("panicked") {
            bail!("the weir server panicked; its log:\n{log}");
        }
        Ok(())
    }
}

/// A durable classic queue with a random name on the RabbitMQ broker.
struct RabbitQueue {
    uri: String,
    name: String,
    /// The control connection: declares, purges and deletes the queue.
    connection: Connection,
    channel: Channel,
}

impl RabbitQueue {
    async fn declare(uri: &str) -> Result<RabbitQueue> {
        let connection = amqp_connect(uri).await?;
        let channel = connection.create_channel().await?;
        let name = format!("weir_bench_{:08x}", rand::random::<u32>());
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::durable(),
                arguments,
            )
            .await
            .context("declare the durable benchmark queue")?;
        Ok(RabbitQueue {
            uri: uri.to_string(),
            name,
            connection,
            channel,
        })
    }

    /// Empties the queue between runs, so every run starts from the same state.
    async fn purge(&self) -> Result<()> {
        self.channel
            .queue_purge(self.name.as_str().into(), QueuePurgeOptions::default())
            .await
            .context("purge the benchmark queue")?;
        Ok(())
    }

    async fn delete(self) -> Result<()> {
        self.channel
            .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
            .await
            .context("delete the benchmark queue")?;
        self.connection.close(200, "bye".into()).await?;
        Ok(())
    }
}

async fn amqp_connect(uri: &str) -> Result<Connection> {
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect(uri, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| anyhow!("no answer within {CONNECT_TIMEOUT:?}"))?
    .map_err(|e| anyhow!("{e}"))
}

/// What one producer talks to.
enum Target<'a> {
    Weir(System, &'a WeirServer),
    Rabbit(&'a RabbitQueue),
}

/// One synchronous producer: one connection (and for RabbitMQ one channel).
enum Producer {
    Http {
        sender: SendRequest<Full<Bytes>>,
        uri: String,
        host: String,
    },
    Pg {
        client: tokio_postgres::Client,
        insert: tokio_postgres::Statement,
    },
    Rabbit {
        connection: Connection,
        channel: Channel,
        queue: String,
    },
}

impl Producer {
    async fn connect(target: &Target<'_>) -> Result<Producer> {
        match target {
            Target::Weir(System::WeirHttp, server) => {
                let stream = tokio::net::TcpStream::connect(server.http_addr).await?;
                stream.set_nodelay(true)?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                // Drives the connection; ends when `sender` is dropped.
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        eprintln!("http connection: {e}");
                    }
                });
                Ok(Producer::Http {
                    sender,
                    uri: format!("/v1/topics/{}/messages", server.topic),
                    host: server.http_addr.to_string(),
                })
            }
            Target::Weir(_, server) => {
                let client = server.sql().await?;
                let insert = client
                    .prepare(&format!(
                        "INSERT INTO {} (payload) VALUES ($1)",
                        server.topic
                    ))
                    .await
                    .context("prepare the INSERT")?;
                Ok(Producer::Pg { client, insert })
            }
            Target::Rabbit(queue) => {
                let connection = amqp_connect(&queue.uri).await?;
                let channel = connection.create_channel().await?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .context("enable publisher confirms")?;
                Ok(Producer::Rabbit {
                    connection,
                    channel,
                    queue: queue.name.clone(),
                })
            }
        }
    }

    /// Publishes one message and returns once it is acknowledged as durable.
    async fn publish(&mut self, payload: &Bytes) -> Result<()> {
        match self {
            Producer::Http { sender, uri, host } => {
                sender.ready().await?;
                let request = hyper::Request::post(uri.as_str())
                    .header(hyper::header::HOST, host.as_str())
                    .header(hyper::header::CONTENT_TYPE, "text/plain")
                    .body(Full::new(payload.clone()))?;
                let response = sender.send_request(request).await?;
                let status = response.status();
                let body = response.into_body().collect().await?.to_bytes();
                if status != hyper::StatusCode::OK {
                    bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
                }
            }
            Producer::Pg { client, insert } => {
                let text = std::str::from_utf8(payload).context("payload is UTF-8")?;
                let n = client.execute(insert, &[&text]).await?;
                if n != 1 {
                    bail!("INSERT reported {n} rows, expected 1");
                }
            }
            Producer::Rabbit { channel, queue, .. } => {
                let confirm = channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        payload,
                        // 2 = persistent.
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await?
                    .await?;
                if !confirm.is_ack() {
                    bail!("RabbitMQ nacked a message");
                }
            }
        }
        Ok(())
    }

    async fn close(self) {
        if let Producer::Rabbit {
            connection,
            channel,
            ..
        } = self
        {
            let _ = channel.close(200, "bye".into()).await;
            let _ = connection.close(200, "bye".into()).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Runs and statistics
// ---------------------------------------------------------------------------------------

struct RunResult {
    messages: usize,
    elapsed: Duration,
    /// Send → acknowledgement, of every message in the timed window, sorted.
    latencies: Vec<Duration>,
}

impl RunResult {
    fn messages_per_s(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One timed run: `producers` synchronous producers publishing `payload` for `run_length`.
async fn run_once(
    target: &Target<'_>,
    producers: usize,
    payload: &Bytes,
    run_length: Duration,
) -> Result<RunResult> {
    let mut connected = Vec::with_capacity(producers);
    for _ in 0..producers {
        let mut producer = Producer::connect(target).await?;
        for _ in 0..WARMUP_MESSAGES {
            producer.publish(payload).await.context("warm-up publish")?;
        }
        connected.push(producer);
    }
    let start = Instant::now();
    let deadline = start + run_length;
    let mut tasks = JoinSet::new();
    for mut producer in connected {
        let payload = payload.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut result = Ok(());
            while Instant::now() < deadline {
                let sent = Instant::now();
                match tokio::time::timeout(PUBLISH_TIMEOUT, producer.publish(&payload)).await {
                    Ok(Ok(())) => latencies.push(sent.elapsed()),
                    Ok(Err(e)) => {
                        result = Err(e);
                        break;
                    }
                    Err(_) => {
                        result = Err(anyhow!("a publish took over {PUBLISH_TIMEOUT:?}"));
                        break;
                    }
                }
            }
            producer.close().await;
            result.map(|()| latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        latencies.extend(joined.context("producer task")??);
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    Ok(RunResult {
        messages: latencies.len(),
        elapsed,
        latencies,
    })
}

struct Row {
    system: System,
    size: usize,
    producers: usize,
    /// Every run, sorted by throughput; the median is reported.
    runs: Vec<RunResult>,
}

impl Row {
    fn median(&self) -> &RunResult {
        &self.runs[self.runs.len() / 2]
    }
}

async fn measure(
    target: &Target<'_>,
    system: System,
    options: &Options,
    rows: &mut Vec<Row>,
) -> Result<()> {
    for &size in &options.sizes {
        let payload = payload(size);
        for &producers in &options.producers {
            let mut runs = Vec::with_capacity(options.runs);
            for run in 1..=options.runs {
                if let Target::Rabbit(queue) = target {
                    queue.purge().await?;
                }
                let result = run_once(target, producers, &payload, options.run_length)
                    .await
                    .with_context(|| {
                        format!("{} {size} B × {producers}, run {run}", system.label())
                    })?;
                eprintln!(
                    "{:<13} {size:>5} B × {producers}  run {run}/{}: {:>8.0} msg/s  p50 {:.2} ms  p99 {:.2} ms",
                    system.label(),
                    options.runs,
                    result.messages_per_s(),
                    ms(result.percentile(50.0)),
                    ms(result.percentile(99.0)),
                );
                runs.push(result);
            }
            runs.sort_by(|a, b| a.messages_per_s().total_cmp(&b.messages_per_s()));
            rows.push(Row {
                system,
                size,
                producers,
                runs,
            });
        }
    }
    Ok(())
}

fn print_table(rows: &[Row], runs: usize) {
    println!(
        "| system | size | producers | msg/s | MB/s | p50 ms | p99 ms | msg/s of the {runs} runs |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for row in rows {
        let median = row.median();
        let all: Vec<String> = row
            .runs
            .iter()
            .map(|r| format!("{:.0}", r.messages_per_s()))
            .collect();
        println!(
            "| {} | {} B | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
            row.system.label(),
            row.size,
            row.producers,
            median.messages_per_s(),
            median.messages_per_s() * row.size as f64 / 1e6,
            ms(median.percentile(50.0)),
            ms(median.percentile(99.0)),
            all.join(", "),
        );
    }
}

// ---------------------------------------------------------------------------------------
// End to end: Weir publish (HTTP) → fetch (stream subscription over pgwire)
// ---------------------------------------------------------------------------------------

struct EndToEnd {
    producers: usize,
    published: usize,
    fetched: usize,
    /// Publish sent → row fetched, sorted.
    latencies: Vec<Duration>,
}

/// Producers publish over HTTP while one consumer long-polls a stream subscription
/// (`start = 'latest'`) with `FETCH ... WAIT`. Each payload starts with its send time in
/// microseconds since `base`, so the consumer can measure the delay without coordination.
async fn end_to_end(
    server: &WeirServer,
    producers: usize,
    size: usize,
    run_length: Duration,
) -> Result<EndToEnd> {
    let subscription = format!("{}_e2e_{producers}", server.topic);
    let consumer = server.sql().await?;
    consumer
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION {subscription} ON TOPIC {} WITH (mode = 'stream', start = 'latest')",
            server.topic
        ))
        .await
        .context("create the end-to-end subscription")?;
    let base = Instant::now();
    let fetch = format!("FETCH 1000 FROM SUBSCRIPTION {subscription} WAIT '200ms'");
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(None::<usize>);
    // Reads until it has every message the producers published (known once they finish),
    // or until a deadline after that.
    let consumer_task = tokio::spawn(async move {
        let mut latencies = Vec::new();
        let mut fetched = 0usize;
        let mut give_up_at: Option<Instant> = None;
        loop {
            let published = *done_rx.borrow_and_update();
            if let Some(published) = published {
                if fetched >= published {
                    break;
                }
                let at = *give_up_at.get_or_insert_with(|| Instant::now() + CONNECT_TIMEOUT);
                if Instant::now() > at {
                    break;
                }
            }
            let messages = consumer.simple_query(&fetch).await?;
            let now = base.elapsed();
            for message in messages {
                if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
                    fetched += 1;
                    let sent = row
                        .get("payload")
                        .and_then(|p| p.split(' ').next())
                        .and_then(|micros| micros.parse::<u64>().ok())
                        .ok_or_else(|| anyhow!("a fetched payload without a send time"))?;
                    latencies.push(now.saturating_sub(Duration::from_micros(sent)));
                }
            }
        }
        consumer
            .batch_execute(&format!("DROP SUBSCRIPTION {subscription}"))
            .await?;
        anyhow::Ok((fetched, latencies))
    });

    let mut connected = Vec::with_capacity(producers);
    for _ in 0..producers {
        connected.push(Producer::connect(&Target::Weir(System::WeirHttp, server)).await?);
    }
    let deadline = Instant::now() + run_length;
    let mut tasks = JoinSet::new();
    for mut producer in connected {
        tasks.spawn(async move {
            let mut published = 0usize;
            let mut text = String::with_capacity(size);
            while Instant::now() < deadline {
                text.clear();
                text.push_str(&format!("{} ", base.elapsed().as_micros()));
                while text.len() < size {
                    text.push('x');
                }
                let body = Bytes::from(text.clone());
                tokio::time::timeout(PUBLISH_TIMEOUT, producer.publish(&body))
                    .await
                    .map_err(|_| anyhow!("a publish took over {PUBLISH_TIMEOUT:?}"))??;
                published += 1;
            }
            anyhow::Ok(published)
        });
    }
    let mut published = 0;
    while let Some(joined) = tasks.join_next().await {
        published += joined.context("producer task")??;
    }
    done_tx.send_replace(Some(published));
    let (fetched, mut latencies) = consumer_task.await.context("consumer task")??;
    latencies.sort_unstable();
    Ok(EndToEnd {
        producers,
        published,
        fetched,
        latencies,
    })
}

// ---------------------------------------------------------------------------------------

async fn bench(options: Options) -> Result<ExitCode> {
    let require_brokers = std::env::var("WEIR_REQUIRE_BROKERS").is_ok_and(|v| v == "1");
    let amqp_uri = std::env::var("WEIR_BENCH_AMQP").unwrap_or_else(|_| DEFAULT_AMQP_URI.into());
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut end_to_end_results = Vec::new();

    // Ask RabbitMQ first, so a required broker that is down fails before minutes of Weir runs.
    let mut rabbit = None;
    if options.systems.contains(&System::RabbitMq) {
        match RabbitQueue::declare(&amqp_uri).await {
            Ok(queue) => {
                eprintln!("rabbitmq: durable classic queue {}", queue.name);
                rabbit = Some(queue);
            }
            Err(e) => {
                let note =
                    format!("RabbitMQ did not answer at {amqp_uri}: {e:#}; RabbitMQ not measured");
                eprintln!("{note}");
                if require_brokers {
                    eprintln!("WEIR_REQUIRE_BROKERS=1: failing");
                    return Ok(ExitCode::FAILURE);
                }
                notes.push(note);
            }
        }
    }

    let wants_weir = options
        .systems
        .iter()
        .any(|s| matches!(s, System::WeirHttp | System::WeirPg));
    let weir = async {
        if !wants_weir {
            return Ok(());
        }
        let server = WeirServer::start().await?;
        eprintln!(
            "weir: data directory {} (topic {}, 4 partitions)",
            server.data_dir.path().display(),
            server.topic
        );
        for &system in &options.systems {
            if system != System::RabbitMq {
                measure(&Target::Weir(system, &server), system, &options, &mut rows).await?;
            }
        }
        let mut e2e = Vec::new();
        if options.e2e {
            for &producers in &options.producers {
                let result = end_to_end(&server, producers, 100, options.run_length).await?;
                eprintln!(
                    "Weir end to end × {producers}: {} published, {} fetched, p50 {:.2} ms",
                    result.published,
                    result.fetched,
                    ms(percentile(&result.latencies, 50.0))
                );
                e2e.push(result);
            }
        }
        server.stop().await?;
        end_to_end_results = e2e;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = weir {
        if let Some(queue) = rabbit {
            // A durable queue outlives the bench: never leave one behind.
            let _ = queue.delete().await;
        }
        return Err(e);
    }

    if let Some(queue) = rabbit {
        let measured = measure(
            &Target::Rabbit(&queue),
            System::RabbitMq,
            &options,
            &mut rows,
        )
        .await;
        // Delete the queue even when a run failed.
        let deleted = queue.delete().await;
        measured?;
        deleted?;
    }
    // Side by side: each configuration's systems on adjacent lines.
    rows.sort_by_key(|r| (r.size, r.producers, r.system as u8));
    print_table(&rows, options.runs);
    if !end_to_end_results.is_empty() {
        println!();
        print_end_to_end(&end_to_end_results);
    }
    for note in notes {
        println!("\n**{note}**");
    }
    Ok(ExitCode::SUCCESS)
}

fn print_end_to_end(results: &[EndToEnd]) {
    println!(
        "| Weir end to end (HTTP publish → pgwire FETCH), 100 B | published | fetched | p50 ms | p99 ms |"
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    for r in results {
        println!(
            "| {} producer(s), 1 stream consumer | {} | {} | {:.2} | {:.2} |",
            r.producers,
            r.published,
            r.fetched,
            ms(percentile(&r.latencies, 50.0)),
            ms(percentile(&r.latencies, 99.0)),
        );
    }
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("queue bench: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if !Path::new(DATA_PARENT).is_dir() {
        eprintln!("queue bench: {DATA_PARENT} does not exist");
        return ExitCode::FAILURE;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime for the bench");
    match runtime.block_on(bench(options)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("queue bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
