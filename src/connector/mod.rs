//! Connectors: where a stream's rows come from and where a view's output goes. `api.rs` holds
//! the [`api::Source`] contract the streaming runtime reads through and the [`api::Sink`]
//! contract (two-phase commit with the runtime's checkpoints); one folder per system
//! (`builtin/` for Weir's own topics and tables, as sources and a topic sink; `rabbitmq/` a
//! broker ingest and sink; `parquet/` files through `object_store`; `nexmark/` a Nexmark bid
//! generator).
//!
//! Connectors decode bytes into Arrow (through `format`) and report undecodable messages; they
//! never compute watermarks, never decide what is late, and hold no operator state (a sink
//! holds only its own uncommitted output).

pub mod api;
pub mod builtin;
pub mod nexmark;
pub mod parquet;
pub mod rabbitmq;
