//! Bytes ↔ Arrow: how rows are stored in logs and read from clients.
//!
//! Owns the encodings only (Arrow IPC for change logs, PostgreSQL COPY text
//! and CSV for ingest, PostgreSQL text output); it never touches files or
//! sockets itself.

pub mod copy;
pub mod decode;
pub mod ipc;
pub mod pgtext;
