//! Connectors: where a stream's rows come from. `api.rs` holds the [`api::Source`] contract the
//! streaming runtime reads through; one folder per system (`builtin/` for Weir's own topics and
//! tables; `nexmark/` a Nexmark bid generator; brokers join as folders of their own).
//!
//! Connectors decode bytes into Arrow (through `format`) and report undecodable messages; they
//! never compute watermarks, never hold operator state and never decide what is late.

pub mod api;
pub mod builtin;
pub mod nexmark;
pub mod rabbitmq;
pub mod parquet;
