//! Weir's one integration-test binary (every extra test target would link DataFusion again).
//!
//! `harness` holds the shared machinery; each other module tests one surface of the server.

mod checkpoints;
mod cli;
mod docs;
mod durability;
mod exactly_once;
mod harness;
mod http_queue;
mod log;
mod parquet_sink;
mod protocol;
mod psql;
mod queue;
mod queue_crash;
mod rabbitmq;
mod s3;
mod slt;
mod sources;
mod streaming;
mod tidy;
mod topics;
