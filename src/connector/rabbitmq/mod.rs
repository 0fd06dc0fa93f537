//! `connector = 'rabbitmq'`: RabbitMQ over AMQP 0.9.1 (lapin). `source.rs` reads a queue or a
//! stream queue into a source's own durable log, exactly once ([`IngestLog`], [`run`]);
//! `sink.rs` publishes a view's output to an exchange ([`RabbitSink`]). This root holds what both
//! share: the options and their checking ([`RabbitMqConfig`]), the limits, connecting, and the
//! mapping of broker errors to SQLSTATEs (08001 unreachable, 28P01 login refused, ...).
//!
//! Nothing here panics on user input or broker messages (names are checked to fit AMQP short
//! strings before lapin sees them) or prints a password ([`RabbitMqConfig::broker`] leaves it
//! out). The module imports neither `queue` nor `sql`: the engine passes options in as pairs
//! and implements [`IngestLog`] over the source's topic.

mod gate;
mod sink;
mod source;

pub use gate::AckGate;
pub use sink::{RabbitSink, SINK_OPTIONS};
pub use source::{
    HEADER_REDELIVERED, HEADER_STREAM_OFFSET, IngestLog, IngestMessage, IngestSnapshot,
    IngestStatus, check, run,
};

use std::fmt;
use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::ShortString;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind};

use crate::types::{SqlState, WeirError, WeirResult};

/// The options `connector = 'rabbitmq'` takes (`idle_timeout` is the engine's, for every source).
pub const OPTIONS: &[&str] = &[
    "connector",
    "url",
    "queue",
    "exchange",
    "routing_key",
    "declare",
    "prefetch",
    "mode",
    "start",
    "ack",
    "idle_timeout",
];

/// `url` when none is given: the local broker's default user and vhost.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Limits of the ingest, in one place.
const PREFETCH_DEFAULT: u16 = 1000;

/// A connection attempt (TCP + AMQP handshake) that takes longer fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Closing a channel and its connection politely takes at most this; then they are dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// First wait before reconnecting; doubles per failed attempt up to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_millis(100);

const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Messages read per call while loading the fingerprints of a crash window.
const RECOVERY_PAGE_MESSAGES: usize = 1024;

/// At most this many of the newest messages after the marker are fingerprinted (a window is
/// normally one batch, at most `prefetch` = 65535 messages; this bounds memory if markers could
/// not be written for a long time).
const RECOVERY_FINGERPRINTS_MAX: u64 = 1_000_000;

/// The AMQP 0.9.1 limit on queue, exchange and routing key names (short strings).
const NAME_BYTES_MAX: usize = 255;

/// How the queue is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RabbitMqMode {
    /// A classic or quorum queue: manual acks after the covering checkpoint (or the durable
    /// append), redeliveries deduplicated.
    Queue,
    /// A stream queue: the stream offset is stored with each message and resumed from.
    Stream,
}

/// When a queue-mode delivery is acknowledged to RabbitMQ (`ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckAfter {
    /// Once every reader of the source (views, sinks, the monitor) committed a checkpoint that
    /// covers the message ([`AckGate`]): RabbitMQ keeps what Weir has not checkpointed.
    Checkpoint,
    /// Once the message is durable in the source's own log (faster: no checkpoint is waited
    /// for, and `prefetch` never stalls the consumer).
    Append,
}

/// Where a stream is first read from (`start`), while the source's log is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamStart {
    First,
    Last,
    Next,
    Offset(u64),
}

/// A checked `WITH (connector = 'rabbitmq', ...)`.
#[derive(Clone)]
pub struct RabbitMqConfig {
    /// Holds the password: never printed ([`RabbitMqConfig::broker`] leaves it out).
    uri: AMQPUri,
    pub queue: String,
    pub exchange: Option<String>,
    /// Binding key (`''` when only `exchange` is given).
    pub routing_key: String,
    pub declare: bool,
    pub prefetch: u16,
    pub mode: RabbitMqMode,
    pub start: StreamStart,
    /// Queue mode only (a stream's acks are credit).
    pub ack: AckAfter,
}

impl fmt::Debug for RabbitMqConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqConfig")
            .field("broker", &self.broker())
            .field("queue", &self.queue)
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("declare", &self.declare)
            .field("prefetch", &self.prefetch)
            .field("mode", &self.mode)
            .field("start", &self.start)
            .field("ack", &self.ack)
            .finish()
    }
}

fn invalid(message: impl Into<String>, hint: impl Into<String>) -> WeirError {
    WeirError::new(SqlState::INVALID_PARAMETER_VALUE, message).with_hint(hint)
}

/// A queue, exchange or routing key name: at most 255 bytes (an AMQP short string).
fn amqp_name(option: &str, value: &str) -> WeirResult<String> {
    if value.len() > NAME_BYTES_MAX {
        return Err(invalid(
            format!(
                "{option} is {} bytes long; RabbitMQ names are at most {NAME_BYTES_MAX} bytes",
                value.len()
            ),
            format!("use a shorter {option}"),
        ));
    }
    Ok(value.to_string())
}

impl RabbitMqConfig {
    /// From `WITH (...)` options. Unknown options, bad values, a missing `queue`, `start` with
    /// `mode = 'queue'` and `routing_key` without `exchange` are 22023; `amqps` is 0A000.
    pub fn from_options(options: &[(String, String)]) -> WeirResult<RabbitMqConfig> {
        let mut url = DEFAULT_URL.to_string();
        let mut queue = None;
        let mut exchange = None;
        let mut routing_key = None;
        let mut declare = false;
        let mut prefetch = PREFETCH_DEFAULT;
        let mut mode = RabbitMqMode::Queue;
        let mut start = None;
        let mut ack = None;
        for (key, value) in options {
            match key.as_str() {
                "connector" | "idle_timeout" => {}
                "url" => url = value.clone(),
                "queue" => queue = Some(amqp_name("queue", value)?),
                "exchange" => exchange = Some(amqp_name("exchange", value)?),
                "routing_key" => routing_key = Some(amqp_name("routing_key", value)?),
                "declare" => {
                    declare = match value.to_ascii_lowercase().as_str() {
                        "true" | "on" | "yes" | "1" => true,
                        "false" | "off" | "no" | "0" => false,
                        _ => {
                            return Err(invalid(
                                format!("invalid value for declare: \"{value}\""),
                                "declare = 'true' or 'false'",
                            ));
                        }
                    }
                }
                "prefetch" => {
                    prefetch = value
                        .trim()
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p >= 1)
                        .ok_or_else(|| {
                            invalid(
                                format!("invalid value for prefetch: \"{value}\""),
                                "prefetch is a whole number of messages from 1 to 65535",
                            )
                        })?
                }
                "mode" => {
                    mode = match value.to_ascii_lowercase().as_str() {
                        "queue" => RabbitMqMode::Queue,
                        "stream" => RabbitMqMode::Stream,
                        _ => {
                            return Err(invalid(
                                format!("invalid value for mode: \"{value}\""),
                                "mode = 'queue' (classic and quorum queues) or 'stream' (stream queues)",
                            ));
                        }
                    }
                }
                "start" => start = Some(parse_start(value)?),
                "ack" => {
                    ack = Some(match value.to_ascii_lowercase().as_str() {
                        "checkpoint" => AckAfter::Checkpoint,
                        "append" => AckAfter::Append,
                        _ => {
                            return Err(invalid(
                                format!("invalid value for ack: \"{value}\""),
                                "ack = 'checkpoint' (after the checkpoint that covers the message) or 'append' (after the durable append to the source's log)",
                            ));
                        }
                    })
                }
                other => {
                    return Err(invalid(
                        format!("unknown option \"{other}\" for connector 'rabbitmq'"),
                        format!("valid options: {}", OPTIONS.join(", ")),
                    ));
                }
            }
        }
        let queue = queue.ok_or_else(|| {
            invalid(
                "connector 'rabbitmq' needs the option queue",
                "WITH (connector = 'rabbitmq', queue = 'orders')",
            )
        })?;
        if start.is_some() && mode == RabbitMqMode::Queue {
            return Err(invalid(
                "start applies to stream queues only",
                "set mode = 'stream' to read a stream queue, or drop start",
            ));
        }
        if ack.is_some() && mode == RabbitMqMode::Stream {
            return Err(invalid(
                "ack applies to mode = 'queue' only",
                "a stream source stores each message's stream offset and resumes from it; drop ack",
            ));
        }
        if routing_key.is_some() && exchange.is_none() {
            return Err(invalid(
                "routing_key needs exchange",
                "set exchange = '...' to bind the queue to it, or drop routing_key",
            ));
        }
        let uri: AMQPUri = url.parse().map_err(|e: String| {
            // The text may hold a password: say what is wrong, not what was written.
            invalid(
                format!("invalid RabbitMQ url: {e}"),
                "write url = 'amqp://user:password@host:5672/vhost' (%2f is the vhost /)",
            )
        })?;
        if uri.scheme == AMQPScheme::AMQPS {
            return Err(WeirError::unsupported(
                "amqps (TLS) RabbitMQ urls are not supported yet",
                "use amqp://, or put a TLS terminating proxy in front of RabbitMQ",
            ));
        }
        Ok(RabbitMqConfig {
            uri,
            queue,
            exchange,
            routing_key: routing_key.unwrap_or_default(),
            declare,
            prefetch,
            mode,
            start: start.unwrap_or(StreamStart::First),
            ack: ack.unwrap_or(AckAfter::Checkpoint),
        })
    }

    /// `amqp://user@host:port/vhost`: the broker without the password.
    pub fn broker(&self) -> String {
        let vhost = self.uri.vhost.replace('%', "%25").replace('/', "%2f");
        format!(
            "amqp://{}@{}/{vhost}",
            self.uri.authority.userinfo.username,
            self.address()
        )
    }

    /// `host:port`.
    pub fn address(&self) -> String {
        format!("{}:{}", self.uri.authority.host, self.uri.authority.port)
    }

    /// What the source reads, for `weir_sources`: broker, queue and binding, never the password.
    pub fn origin(&self) -> String {
        let mut text = format!("rabbitmq {} queue \"{}\"", self.broker(), self.queue);
        if self.mode == RabbitMqMode::Stream {
            text.push_str(" (stream)");
        }
        if let Some(exchange) = &self.exchange {
            text.push_str(&format!(
                " bound to exchange \"{exchange}\" with key \"{}\"",
                self.routing_key
            ));
        }
        text
    }
}

fn parse_start(value: &str) -> WeirResult<StreamStart> {
    match value.trim().to_ascii_lowercase().as_str() {
        "first" => Ok(StreamStart::First),
        "last" => Ok(StreamStart::Last),
        "next" => Ok(StreamStart::Next),
        other => other
            .parse::<u64>()
            .ok()
            .filter(|n| i64::try_from(*n).is_ok())
            .map(StreamStart::Offset)
            .ok_or_else(|| {
                invalid(
                    format!("invalid value for start: \"{value}\""),
                    "start = 'first', 'last', 'next' or a stream offset such as '1000'",
                )
            }),
    }
}

/// Closes `channel`, then `connection`, each only if still open, within [`CLOSE_TIMEOUT`]
/// (best effort: dropping closes too). In this order because lapin reports a spurious
/// connection error when a connection closes while one of its channels is still closing.
async fn close_gracefully(channel: Option<&Channel>, connection: &Connection) {
    let close = async {
        if let Some(channel) = channel
            && channel.status().connected()
        {
            let _ = channel.close(200, "OK".into()).await;
        }
        if connection.status().connected() {
            let _ = connection.close(200, "OK".into()).await;
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
}

/// A name for lapin, checked at parse time to fit a short string.
fn short(name: &str) -> WeirResult<ShortString> {
    ShortString::try_new(name).map_err(|_| {
        WeirError::internal(format!(
            "name of {} bytes passed the length check",
            name.len()
        ))
    })
}

async fn connect(config: &RabbitMqConfig, source: &str) -> WeirResult<Connection> {
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("weir source {source} (queue {})", config.queue).into());
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect_uri(config.uri.clone(), properties),
    )
    .await
    {
        Err(_) => Err(WeirError::new(
            SqlState::UNABLE_TO_CONNECT,
            format!(
                "could not connect to RabbitMQ at {}: no answer within {}s",
                config.address(),
                CONNECT_TIMEOUT.as_secs()
            ),
        )
        .with_hint("check that RabbitMQ runs there and that url names the right host and port")),
        Ok(Err(e)) => Err(connect_error(config, &e)),
        Ok(Ok(connection)) => Ok(connection),
    }
}

fn amqp_kind(e: &lapin::Error) -> Option<(&AMQPErrorKind, String)> {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => Some((amqp.kind(), amqp.get_message().to_string())),
        _ => None,
    }
}

fn connect_error(config: &RabbitMqConfig, e: &lapin::Error) -> WeirError {
    let address = config.address();
    match amqp_kind(e) {
        Some((AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED), text)) => WeirError::new(
            SqlState::INVALID_PASSWORD,
            format!(
                "RabbitMQ at {address} refused the login of user \"{}\"",
                config.uri.authority.userinfo.username
            ),
        )
        .with_detail(text)
        .with_hint("check the user name and password in url"),
        Some((AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED), text)) => WeirError::new(
            SqlState("08004"),
            format!(
                "RabbitMQ at {address} refused access to vhost \"{}\"",
                config.uri.vhost
            ),
        )
        .with_detail(text)
        .with_hint("check the vhost in url (%2f is the vhost /) and the user's permissions on it"),
        _ => WeirError::new(
            SqlState::UNABLE_TO_CONNECT,
            format!("could not connect to RabbitMQ at {address}: {e}"),
        )
        .with_hint("check that RabbitMQ runs there and that url names the right host and port"),
    }
}

/// An error on an established channel or connection.
fn channel_error(config: &RabbitMqConfig, doing: &str, e: &lapin::Error) -> WeirError {
    WeirError::new(
        SqlState::CONNECTION_EXCEPTION,
        format!(
            "RabbitMQ connection to {} failed while {doing} the channel: {e}",
            config.address()
        ),
    )
    .with_hint("the ingest reconnects by itself")
}

async fn open_channel(config: &RabbitMqConfig, connection: &Connection) -> WeirResult<Channel> {
    connection
        .create_channel()
        .await
        .map_err(|e| channel_error(config, "opening", &e))
}

fn is_soft(e: &lapin::Error, kind: AMQPSoftError) -> bool {
    matches!(amqp_kind(e), Some((AMQPErrorKind::Soft(k), _)) if *k == kind)
}
