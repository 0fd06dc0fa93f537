//! The `weir serve` command's failure modes: a taken port, an unusable data
//! directory, a data directory already in use. Each must exit non-zero with a
//! message saying what to do, never hang or panic.

use std::process::Stdio;

use tokio::process::Command;

use crate::harness::{TestServer, simple_value, within};

/// Runs `weir serve` with `args` and returns (exit success, stderr).
async fn serve_fails(args: &[&str]) -> (bool, String) {
    let output = within(
        "weir serve to exit",
        Command::new(env!("CARGO_BIN_EXE_weir"))
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run the weir binary");
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(!stderr.contains("panicked"), "weir panicked:\n{stderr}");
    (output.status.success(), stderr)
}

#[tokio::test]
async fn taken_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let port = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf-8 path");
    let (ok, stderr) = serve_fails(&[
        "--data-dir",
        data,
        "--pg-addr",
        &port,
        "--http-addr",
        "127.0.0.1:0",
    ])
    .await;
    assert!(!ok, "weir must exit non-zero when its port is taken");
    assert!(
        stderr.contains(&format!("cannot listen on {port}")),
        "{stderr}"
    );
    assert!(
        stderr.contains("--pg-addr"),
        "the hint names the flag: {stderr}"
    );
}

#[tokio::test]
async fn unusable_data_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("write a file");
    let data = file.to_str().expect("utf-8 path");
    let (ok, stderr) = serve_fails(&[
        "--data-dir",
        data,
        "--pg-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ])
    .await;
    assert!(!ok);
    assert!(stderr.contains("is unusable"), "{stderr}");
    assert!(stderr.contains("--data-dir"), "{stderr}");
}

#[tokio::test]
async fn data_dir_in_use_is_refused() {
    let server = TestServer::start().await;
    let data = server.data_dir().to_str().expect("utf-8 path").to_string();
    let (ok, stderr) = serve_fails(&[
        "--data-dir",
        &data,
        "--pg-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ])
    .await;
    assert!(!ok);
    assert!(
        stderr.contains("in use by another weir process"),
        "{stderr}"
    );
    // The first server is unaffected.
    let client = server.connect().await;
    assert_eq!(simple_value(&client, "SELECT 1").await, "1");
    server.shutdown().await;
}
