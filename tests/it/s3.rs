//! A real S3-compatible server for the tests: moto's server (`python -m moto.server`) from the
//! tests' Python venv, on 127.0.0.1 with a port of its own, killed on drop; and [`python`], which
//! finds that venv for every test that drives a Python tool (moto, pyarrow, pika).
//!
//! The venv: `$WEIR_PYTHON` when set (`.ci/run` sets it); otherwise the tests run
//! `.ci/run --python` once, which creates or reuses `~/.cache/weir-py` with the pinned packages,
//! so a bare `cargo test` works on a fresh machine. When no Python can be had the tests that need
//! it are skipped, or fail when `WEIR_REQUIRE_BROKERS=1` (as in CI).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, OnceLock};

use object_store::aws::{AmazonS3, AmazonS3Builder};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::harness::within;

/// Credentials moto accepts (it checks none); passed explicitly so no test ever falls back to
/// the instance-metadata endpoint for credentials.
pub(crate) const ACCESS_KEY_ID: &str = "weir-test";
pub(crate) const SECRET_ACCESS_KEY: &str = "weir-test-secret";
pub(crate) const REGION: &str = "us-east-1";

/// Whether a missing tool fails the run instead of skipping its tests (CI sets it).
pub(crate) fn require_brokers() -> bool {
    std::env::var("WEIR_REQUIRE_BROKERS").is_ok_and(|v| v == "1")
}

/// The tests' Python interpreter (with pika, pyarrow and moto), or `None` to skip: see the
/// module docs. Panics instead of skipping when `WEIR_REQUIRE_BROKERS=1`.
pub(crate) fn python() -> Option<PathBuf> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PYTHON.get_or_init(find_python) {
        Ok(path) => Some(path.clone()),
        Err(why) if require_brokers() => panic!("WEIR_REQUIRE_BROKERS=1: {why}"),
        Err(why) => {
            eprintln!("skipping: {why}");
            None
        }
    }
}

fn find_python() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("WEIR_PYTHON") {
        let path = PathBuf::from(path);
        return if path.exists() {
            Ok(path)
        } else {
            Err(format!("WEIR_PYTHON={} does not exist", path.display()))
        };
    }
    // Blocks this test's thread for the first install (about a minute); later runs reuse it.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run");
    let output = std::process::Command::new("bash")
        .args([script, "--python"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run {script} --python: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.lines().last() {
        Some(line) if output.status.success() && !line.is_empty() => Ok(PathBuf::from(line)),
        _ => Err(format!(
            "`{script} --python` could not set up the tests' Python venv ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )),
    }
}

/// moto's S3 server on 127.0.0.1; killed when dropped.
pub(crate) struct MotoServer {
    /// `kill_on_drop`: dropping the server kills the process.
    child: Child,
    endpoint: String,
    /// Drains moto's request log from its stderr so it never blocks on a full pipe; ends when
    /// the process exits.
    stderr_drain: JoinHandle<()>,
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        self.stderr_drain.abort();
    }
}

impl MotoServer {
    /// Starts moto on a port the OS picks and waits until it says where it listens; `None`
    /// when no Python is available (the test is then skipped).
    pub(crate) async fn start() -> Option<MotoServer> {
        let python = python()?;
        let mut child = Command::new(&python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} -m moto.server: {e}", python.display()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut lines = BufReader::new(stderr).lines();
        // werkzeug prints ` * Running on http://127.0.0.1:PORT` once the socket listens.
        let endpoint = within("moto's server to listen", async {
            let mut seen = Vec::new();
            loop {
                match lines.next_line().await.expect("read moto's stderr") {
                    Some(line) => {
                        if let Some(at) = line.find("http://127.0.0.1:") {
                            break line[at..].trim().to_string();
                        }
                        seen.push(line);
                    }
                    None => panic!(
                        "moto's server exited before listening:\n{}",
                        seen.join("\n")
                    ),
                }
            }
        })
        .await;
        let stderr_drain =
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Some(MotoServer {
            child,
            endpoint,
            stderr_drain,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Creates `bucket` (`PUT /bucket`, which moto accepts unsigned).
    pub(crate) async fn create_bucket(&self, bucket: &str) {
        let (status, body) = self.request("PUT", &format!("/{bucket}")).await;
        assert_eq!(status, 200, "create bucket {bucket}: {body}");
    }

    /// An `object_store` client for `bucket`, to read back what a test wrote.
    pub(crate) fn store(&self, bucket: &str) -> Arc<AmazonS3> {
        let store = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(REGION)
            .with_endpoint(&self.endpoint)
            .with_access_key_id(ACCESS_KEY_ID)
            .with_secret_access_key(SECRET_ACCESS_KEY)
            .with_allow_http(true)
            .build()
            .expect("an S3 client for moto");
        Arc::new(store)
    }

    /// The `WITH` options of a sink writing to this server (after `path`).
    pub(crate) fn sink_options(&self) -> String {
        format!(
            "endpoint = '{}', region = '{REGION}', access_key_id = '{ACCESS_KEY_ID}', \
             secret_access_key = '{SECRET_ACCESS_KEY}', allow_http = 'true'",
            self.endpoint
        )
    }

    /// One HTTP/1.1 request with an empty body; returns the status and body.
    async fn request(&self, method: &str, path: &str) -> (u16, String) {
        let addr = self
            .endpoint
            .strip_prefix("http://")
            .expect("an http endpoint")
            .to_string();
        within(&format!("moto to answer {method} {path}"), async {
            let mut stream = TcpStream::connect(&addr).await.expect("connect to moto");
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            stream
                .write_all(request.as_bytes())
                .await
                .expect("send to moto");
            let mut response = Vec::new();
            stream
                .read_to_end(&mut response)
                .await
                .expect("read moto's answer");
            let text = String::from_utf8_lossy(&response).into_owned();
            let status = text
                .split_whitespace()
                .nth(1)
                .and_then(|code| code.parse().ok())
                .unwrap_or_else(|| panic!("no status in moto's answer: {text:?}"));
            let body = text
                .split_once("\r\n\r\n")
                .map(|(_, body)| body.to_string())
                .unwrap_or_default();
            (status, body)
        })
        .await
    }
}

#[tokio::test]
async fn moto_serves_a_bucket() {
    let Some(moto) = MotoServer::start().await else {
        return;
    };
    moto.create_bucket("probe").await;
    let store = moto.store("probe");
    use object_store::{ObjectStore, ObjectStoreExt, PutPayload, path::Path};
    let path = Path::from("a/b.txt");
    within(
        "a put to moto",
        store.put(&path, PutPayload::from_static(b"hello")),
    )
    .await
    .expect("put");
    let bytes = within("a get from moto", async {
        store.get(&path).await.expect("get").bytes().await
    })
    .await
    .expect("read");
    assert_eq!(&bytes[..], b"hello");
    let listed: Vec<_> = within("a list from moto", async {
        futures::TryStreamExt::try_collect::<Vec<_>>(store.list(None)).await
    })
    .await
    .expect("list");
    assert_eq!(listed.len(), 1);
}
