//! [`RabbitSink`]: a view's output published to a RabbitMQ exchange (`connector = 'rabbitmq'`
//! in `CREATE SINK`), with publisher confirms.
//!
//! Rows are encoded (JSON or CSV) as they arrive and held until their epoch's checkpoint is
//! durable; `commit` then publishes them (persistent, `message_id` = `<sink>-<epoch>-<n>`) and
//! waits for the broker's confirms. A crash after the checkpoint but before every confirm
//! arrived publishes the epoch again on recovery: RabbitMQ has no way to ask what it already
//! has, so this sink is at least once across a crash in that window, and consumers that want
//! exactly once drop repeated `message_id`s.

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};

use super::{
    AMQPUri, AckAfter, DEFAULT_URL, RabbitMqConfig, RabbitMqMode, StreamStart, connect, invalid,
};
use crate::connector::api::{Sink, encode_appends};
use crate::format::decode::SourceFormat;
use crate::types::{ChangeBatch, SqlState, WeirError, WeirResult};

/// Options of `CREATE SINK ... WITH (connector = 'rabbitmq', ...)`.
pub const SINK_OPTIONS: &[&str] = &["connector", "url", "exchange", "routing_key"];

pub struct RabbitSink {
    name: String,
    config: RabbitMqConfig,
    exchange: String,
    format: SourceFormat,
    session: Option<(Connection, Channel)>,
    /// Encoded rows of the open epoch.
    open: Vec<Vec<u8>>,
    /// Pre-committed epochs waiting for their commit.
    staged: Vec<(u64, Vec<Vec<u8>>)>,
}

impl RabbitSink {
    /// Parses the options, connects, and checks the exchange exists (`''`, the default
    /// exchange, routes by queue name).
    pub async fn open(
        name: &str,
        options: &[(String, String)],
        format: SourceFormat,
    ) -> WeirResult<RabbitSink> {
        let mut url = DEFAULT_URL.to_string();
        let mut exchange = String::new();
        let mut routing_key = None;
        for (key, value) in options {
            match key.as_str() {
                "connector" => {}
                "url" => url = value.clone(),
                "exchange" => exchange = value.clone(),
                "routing_key" => routing_key = Some(value.clone()),
                other => {
                    return Err(invalid(
                        format!("unknown option \"{other}\" for a rabbitmq sink"),
                        format!("valid options: {}", SINK_OPTIONS.join(", ")),
                    ));
                }
            }
        }
        let routing_key = routing_key.ok_or_else(|| {
            invalid(
                "a rabbitmq sink needs routing_key",
                "WITH (connector = 'rabbitmq', exchange = 'results', routing_key = 'windows'); with the default exchange the routing key is the queue's name",
            )
        })?;
        let uri: AMQPUri = url.parse().map_err(|e: String| {
            invalid(
                format!("invalid RabbitMQ url: {e}"),
                "write url = 'amqp://user:password@host:5672/vhost' (%2f is the vhost /)",
            )
        })?;
        let config = RabbitMqConfig {
            uri,
            queue: routing_key,
            exchange: (!exchange.is_empty()).then(|| exchange.clone()),
            routing_key: String::new(),
            declare: false,
            prefetch: 1,
            mode: RabbitMqMode::Queue,
            start: StreamStart::First,
            ack: AckAfter::Append,
        };
        let mut sink = RabbitSink {
            name: name.to_string(),
            config,
            exchange,
            format,
            session: None,
            open: Vec::new(),
            staged: Vec::new(),
        };
        sink.channel().await?;
        Ok(sink)
    }

    /// The open channel (in confirm mode), connecting again if the last one failed.
    async fn channel(&mut self) -> WeirResult<&Channel> {
        let alive = self
            .session
            .as_ref()
            .is_some_and(|(c, ch)| c.status().connected() && ch.status().connected());
        if !alive {
            let connection = connect(&self.config, &format!("sink {}", self.name)).await?;
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| broken(&self.config, "opening a channel", &e))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| broken(&self.config, "enabling publisher confirms", &e))?;
            if !self.exchange.is_empty() {
                let passive = ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                };
                channel
                    .exchange_declare(
                        self.exchange.as_str().into(),
                        ExchangeKind::Direct,
                        passive,
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| {
                        WeirError::new(
                            SqlState::UNDEFINED_OBJECT,
                            format!(
                                "RabbitMQ exchange \"{}\" does not exist at {}",
                                self.exchange,
                                self.config.address()
                            ),
                        )
                        .with_detail(e.to_string())
                        .with_hint("declare the exchange in RabbitMQ first, or leave exchange out to publish to a queue by name")
                    })?;
            }
            self.session = Some((connection, channel));
        }
        self.session
            .as_ref()
            .map(|(_, ch)| ch)
            .ok_or_else(|| WeirError::internal("rabbitmq sink without a channel"))
    }

    async fn publish(&mut self, epoch: u64, payloads: &[Vec<u8>]) -> WeirResult<()> {
        let content_type = match self.format {
            SourceFormat::Json => "application/json",
            SourceFormat::Csv => "text/csv",
        };
        let exchange = self.exchange.clone();
        let routing_key = self.config.queue.clone();
        let name = self.name.clone();
        let config = self.config.clone();
        let result = async {
            let channel = self.channel().await?;
            let mut confirms = Vec::with_capacity(payloads.len());
            for (n, payload) in payloads.iter().enumerate() {
                let properties = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type(content_type.into())
                    .with_message_id(format!("{name}-{epoch}-{n}").into());
                let confirm = channel
                    .basic_publish(
                        exchange.as_str().into(),
                        routing_key.as_str().into(),
                        BasicPublishOptions::default(),
                        payload,
                        properties,
                    )
                    .await
                    .map_err(|e| broken(&config, "publishing on", &e))?;
                confirms.push(confirm);
            }
            for confirm in confirms {
                let confirmation = confirm
                    .await
                    .map_err(|e| broken(&config, "waiting for confirms on", &e))?;
                if confirmation.is_nack() {
                    return Err(WeirError::new(
                        SqlState::CONNECTION_EXCEPTION,
                        format!("RabbitMQ at {} refused a message (nack)", config.address()),
                    )
                    .with_hint("check the broker's log; the epoch is published again"));
                }
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            self.session = None;
        }
        result
    }
}

fn broken(config: &RabbitMqConfig, doing: &str, e: &lapin::Error) -> WeirError {
    WeirError::new(
        SqlState::CONNECTION_EXCEPTION,
        format!(
            "RabbitMQ connection to {} failed while {doing} the channel: {e}",
            config.address()
        ),
    )
    .with_hint("the sink reconnects and publishes the epoch again")
}

#[async_trait]
impl Sink for RabbitSink {
    fn describe(&self) -> String {
        let exchange = if self.exchange.is_empty() {
            "(default exchange)"
        } else {
            self.exchange.as_str()
        };
        format!(
            "rabbitmq {} exchange {exchange} routing_key {}",
            self.config.broker(),
            self.config.queue
        )
    }

    fn write(&mut self, changes: &ChangeBatch) -> WeirResult<()> {
        let encoded = encode_appends(changes, self.format, "rabbitmq")?;
        self.open.extend(encoded);
        Ok(())
    }

    async fn precommit(&mut self, epoch: u64) -> WeirResult<Vec<u8>> {
        let payloads = std::mem::take(&mut self.open);
        let mut state = Vec::new();
        state.extend_from_slice(&epoch.to_le_bytes());
        state.extend_from_slice(&(payloads.len() as u64).to_le_bytes());
        for p in &payloads {
            state.extend_from_slice(&(p.len() as u64).to_le_bytes());
            state.extend_from_slice(p);
        }
        self.staged.push((epoch, payloads));
        Ok(state)
    }

    async fn commit(&mut self, epoch: u64) -> WeirResult<()> {
        while let Some((e, _)) = self.staged.first() {
            if *e > epoch {
                break;
            }
            let (e, payloads) = self.staged[0].clone();
            self.publish(e, &payloads).await?;
            self.staged.remove(0);
        }
        Ok(())
    }

    async fn restore(&mut self, _epoch: u64, state: Option<&[u8]>) -> WeirResult<()> {
        self.open.clear();
        self.staged.clear();
        let Some(mut r) = state else { return Ok(()) };
        let corrupt = || {
            WeirError::new(
                SqlState::DATA_CORRUPTED,
                "rabbitmq sink checkpoint state is unreadable",
            )
        };
        let take = |r: &mut &[u8]| -> WeirResult<u64> {
            let (head, rest) = r.split_at_checked(8).ok_or_else(corrupt)?;
            *r = rest;
            Ok(u64::from_le_bytes(head.try_into().map_err(|_| corrupt())?))
        };
        let epoch = take(&mut r)?;
        let mut payloads = Vec::new();
        for _ in 0..take(&mut r)? {
            let n = usize::try_from(take(&mut r)?).map_err(|_| corrupt())?;
            let (p, rest) = r.split_at_checked(n).ok_or_else(corrupt)?;
            payloads.push(p.to_vec());
            r = rest;
        }
        // Its commit may not have run: publish it (again).
        self.staged.push((epoch, payloads));
        self.commit(epoch).await
    }
}
