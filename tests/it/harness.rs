//! Shared machinery for the integration tests: a Weir server in this process or as a child
//! process, clients, the `psql` binary, raw pgwire frames and plain HTTP.
//!
//! Every wait here has a deadline ([`within`]); nothing sleeps to synchronise ([`poll_until`]
//! polls wall-clock conditions, such as an idle timeout, under the same deadline). Every server gets a
//! fresh temporary data directory and binds port 0, so tests run in parallel without sharing state.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};
use weir::server::{RunningServer, ServerConfig};

/// How long any single wait in a test may take before the test fails. Generous because debug
/// builds of DataFusion are slow and CI machines are small.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Awaits `future`, failing the test with `what` if it takes longer than [`DEADLINE`].
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// Polls `condition` until it gives a value, failing the test after [`DEADLINE`]. Only for
/// conditions that follow wall-clock time (an idle timeout), which no `FLUSH` can wait for.
pub async fn poll_until<T, F, Fut>(what: &str, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    within(what, async {
        loop {
            if let Some(value) = condition().await {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await; // a poll step; within() holds the deadline
        }
    })
    .await
}

/// A Weir server running inside the test process, with its own temporary data directory.
pub struct TestServer {
    server: RunningServer,
    /// Kept so the directory outlives the server; deleted on drop.
    data_dir: TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        let data_dir = TempDir::new().expect("create a temporary data dir");
        let config = ServerConfig {
            pg_addr: "127.0.0.1:0".to_string(),
            http_addr: "127.0.0.1:0".to_string(),
            data_dir: data_dir.path().to_path_buf(),
            checkpoint_interval: std::time::Duration::from_secs(10),
        };
        let server = within(
            "the in-process server to start",
            RunningServer::start(config),
        )
        .await
        .unwrap_or_else(|err| panic!("start the in-process server: {err}"));
        TestServer { server, data_dir }
    }

    pub fn pg_addr(&self) -> SocketAddr {
        self.server.pg_addr()
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.server.http_addr()
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    pub async fn connect(&self) -> Client {
        connect(self.pg_addr()).await
    }

    pub async fn shutdown(self) {
        within("the in-process server to shut down", self.server.shutdown()).await;
    }
}

/// Connects to `addr` as user `postgres` to database `weir` and drives the connection on a
/// background task that ends when the client is dropped or the server closes the socket.
pub async fn connect(addr: SocketAddr) -> Client {
    try_connect(addr)
        .await
        .unwrap_or_else(|err| panic!("connect to {addr}: {err}"))
}

pub async fn try_connect(addr: SocketAddr) -> Result<Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(addr.ip().to_string())
        .port(addr.port())
        .user("postgres")
        .dbname("weir")
        .connect_timeout(Duration::from_secs(10));
    let (client, connection) = within("a pgwire connection", config.connect(NoTls)).await?;
    tokio::spawn(async move {
        // A broken connection surfaces as an error on the client's next call; nothing to do here.
        let _ = connection.await;
    });
    Ok(client)
}

/// The SQLSTATE of a database error; fails the test if `err` is not an error from the server.
pub fn sqlstate(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => db.code().code().to_string(),
        None => panic!("expected an error response from the server, got: {err}"),
    }
}

/// Runs `sql` expecting an error and returns its SQLSTATE.
pub async fn expect_sqlstate(client: &Client, sql: &str) -> String {
    match client.batch_execute(sql).await {
        Ok(()) => panic!("expected `{sql}` to fail, it succeeded"),
        Err(err) => sqlstate(&err),
    }
}

/// Runs one query through the simple protocol and returns its rows as text, NULL as `None`.
pub async fn simple_rows(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|err| panic!("`{sql}` failed: {err}"));
    messages
        .iter()
        .filter_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The single value of a one-row, one-column query, as text.
pub async fn simple_value(client: &Client, sql: &str) -> String {
    let rows = simple_rows(client, sql).await;
    assert_eq!(rows.len(), 1, "`{sql}` should return one row, got {rows:?}");
    assert_eq!(
        rows[0].len(),
        1,
        "`{sql}` should return one column, got {rows:?}"
    );
    rows[0][0]
        .clone()
        .unwrap_or_else(|| panic!("`{sql}` returned NULL"))
}

/// The `weir` binary running as a child process, as an operator would run it.
pub struct BinaryServer {
    child: Child,
    pg_addr: SocketAddr,
    http_addr: SocketAddr,
    /// Drains the child's stdout after the `listening` line so the server never blocks on (or
    /// dies from) a full or closed pipe; ends when the child exits.
    stdout_drain: JoinHandle<()>,
}

impl BinaryServer {
    /// Starts `weir serve` on `data_dir`, appending its stderr to `log`, and waits for the
    /// `weir: listening pg=… http=…` line on stdout.
    pub async fn start(data_dir: &Path, log: &Path) -> BinaryServer {
        BinaryServer::start_with(data_dir, log, &[]).await
    }

    /// [`BinaryServer::start`] with more `weir serve` arguments.
    pub async fn start_with(data_dir: &Path, log: &Path, args: &[&str]) -> BinaryServer {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the server log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--pg-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the weir binary");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let listening = within("the `weir: listening` line", async {
            loop {
                match lines.next_line().await.expect("read the server's stdout") {
                    Some(line) if line.starts_with("weir: listening") => break line,
                    Some(_) => continue,
                    None => panic!(
                        "weir exited before listening; its log:\n{}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    ),
                }
            }
        })
        .await;
        let (pg_addr, http_addr) = parse_listening(&listening);
        let stdout_drain =
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        BinaryServer {
            child,
            pg_addr,
            http_addr,
            stdout_drain,
        }
    }

    pub fn pg_addr(&self) -> SocketAddr {
        self.pg_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub async fn connect(&self) -> Client {
        connect(self.pg_addr()).await
    }

    /// SIGKILL: the process gets no chance to flush or clean up.
    pub async fn kill9(mut self) {
        within("the server to die from SIGKILL", self.child.kill())
            .await
            .expect("send SIGKILL to the server");
        self.stdout_drain.abort();
    }

    /// SIGTERM, then wait for a graceful exit; returns the exit status.
    pub async fn stop(mut self) -> ExitStatus {
        let pid = self.child.id().expect("the server is still running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM {pid} failed: {status}");
        let exit = within("the server to exit after SIGTERM", self.child.wait())
            .await
            .expect("wait for the server");
        self.stdout_drain.abort();
        exit
    }
}

/// Parses `weir: listening pg=127.0.0.1:PORT http=127.0.0.1:PORT`.
fn parse_listening(line: &str) -> (SocketAddr, SocketAddr) {
    let field = |name: &str| -> SocketAddr {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no `{name}ADDR` in the listening line: {line:?}"))
    };
    (field("pg="), field("http="))
}

/// Fails the test if the server log at `log` records a panic.
pub fn assert_no_panics(log: &Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        !text.contains("panicked"),
        "the server panicked; its log:\n{text}"
    );
}

/// Fails the test if the server log at `log` has an `ERROR`-level line: client mistakes are
/// answered to the client, so an error in the log is a server fault.
pub fn assert_no_error_lines(log: &Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let errors: Vec<String> = text
        .lines()
        .map(strip_ansi)
        .filter(|line| line.split_whitespace().nth(1) == Some("ERROR"))
        .collect();
    assert!(
        errors.is_empty(),
        "the server logged errors:\n{}",
        errors.join("\n")
    );
}

/// Removes terminal colour sequences (`ESC [ ... m`), which tracing writes even to files.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// What a `psql` run printed and how it exited.
#[derive(Debug)]
pub struct PsqlOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl PsqlOutput {
    /// Asserts psql exited 0 with nothing on stderr, and returns its stdout.
    pub fn ok(self) -> String {
        assert!(
            self.status.success() && self.stderr.is_empty(),
            "psql failed: {self:#?}"
        );
        self.stdout
    }
}

/// Runs the real `psql` against `addr` with `ON_ERROR_STOP` and no psqlrc, plus `args`.
pub async fn psql(addr: SocketAddr, args: &[&str]) -> PsqlOutput {
    let output = Command::new("psql")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args([
            "-U",
            "postgres",
            "-d",
            "weir",
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = within("psql to finish", output)
        .await
        .expect("run psql (is it installed?)");
    PsqlOutput {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Sends `GET path` over HTTP/1.1 and returns the status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// POSTs `body` with `content_type` and returns (status, body).
pub async fn http_post(
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    body: &str,
) -> (u16, String) {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    http_request(addr, &request).await
}

async fn http_request(addr: SocketAddr, request: &str) -> (u16, String) {
    let response = within("an HTTP response", async {
        let mut stream = TcpStream::connect(addr)
            .await
            .expect("connect to the HTTP port");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send the HTTP request");
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .expect("read the HTTP response");
        response
    })
    .await;
    let text = String::from_utf8(response).expect("the HTTP response is UTF-8");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .expect("HTTP headers end with a blank line");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status code in {head:?}"));
    let chunked = head.lines().any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// The value of an unlabelled Prometheus sample `name` in `metrics`.
pub fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name || key.starts_with(&format!("{name}{{"))).then(|| value.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no sample `{name}` in the metrics:\n{metrics}"))
}

/// A pgwire v3 startup message for user `postgres` and database `weir`.
pub fn startup_message() -> Vec<u8> {
    let mut body = 196_608_i32.to_be_bytes().to_vec(); // protocol 3.0
    for part in ["user", "postgres", "database", "weir", ""] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    let mut message = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    message.extend(body);
    message
}

/// Reads one backend message (type byte and body) from a raw pgwire stream, or `None` if the
/// server closed the connection.
pub async fn read_backend_message(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await.ok()?;
    let len = i32::from_be_bytes(header[1..5].try_into().expect("four bytes"));
    let len = usize::try_from(len - 4).expect("a sane message length from the server");
    let mut body = vec![0; len];
    stream.read_exact(&mut body).await.ok()?;
    Some((header[0], body))
}

/// Waits until the server either closes `stream` or sends an `ErrorResponse` on it, after a
/// client has sent garbage; any other reply fails the test.
pub async fn expect_rejected(stream: &mut TcpStream, what: &str) {
    within(what, async {
        loop {
            match read_backend_message(stream).await {
                None | Some((b'E', _)) => return,
                // Notices and parameter updates may precede the verdict.
                Some((b'N' | b'S', _)) => continue,
                Some((kind, body)) => {
                    panic!("{what}: unexpected reply {:?} {body:?}", kind as char)
                }
            }
        }
    })
    .await
}

/// A temporary directory with a path for the server log inside it.
pub fn temp_dir_with_log() -> (TempDir, PathBuf) {
    let dir = TempDir::new().expect("create a temporary dir");
    let log = dir.path().join("server.log");
    (dir, log)
}

/// Every file under `dir`, relative to it, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(dir) {
                out.push(rel.to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// Every committed `.parquet` file of a local Parquet sink directory, relative to it and
/// sorted: not the ones in its `_weir_staging` area.
pub fn committed_parquet_files(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|f| {
            !f.starts_with("_weir_staging") && f.extension().is_some_and(|e| e == "parquet")
        })
        .collect()
}
