-- From RabbitMQ to Parquet: sensor readings arrive as JSON on a RabbitMQ queue; Weir counts
-- them per sensor and 10-second window and writes each window, once it has closed, to Parquet
-- files (exactly once, also across crashes). The README's "From RabbitMQ to Parquet" walks
-- through it with sql/rabbitmq_producer.py and sql/read_parquet.py.
--
--   psql -h 127.0.0.1 -p 5488 -U postgres -d weir -v out=/tmp/weir-readings \
--        -f sql/rabbitmq_to_parquet.sql
--
-- psql variables (-v name=value):
--   out       the absolute directory for the Parquet files (required; created if missing)
--   queue     the RabbitMQ queue to read (default readings; declared if it does not exist)
--   amqp_url  the broker (default amqp://guest:guest@127.0.0.1:5672/%2f)

\if :{?out}
\else
    \warn 'set the output directory: psql -v out=/absolute/dir -f sql/rabbitmq_to_parquet.sql'
    \quit
\endif
\if :{?queue}
\else
    \set queue readings
\endif
\if :{?amqp_url}
\else
    \set amqp_url 'amqp://guest:guest@127.0.0.1:5672/%2f'
\endif
\set sink_path 'file://' :out

-- Views and sinks created in this session checkpoint every second: a closed window reaches
-- its Parquet file about a second later (files become visible only when a checkpoint commits).
SET checkpoint_interval = '1s';

-- The source: Weir consumes the queue, appends each message durably to the source's own log
-- and only then acknowledges it to RabbitMQ.
CREATE SOURCE readings (
    id BIGINT, sensor TEXT, reading BIGINT, ts TIMESTAMP,
    WATERMARK FOR ts AS ts - INTERVAL '2' SECOND
) WITH (connector = 'rabbitmq', url = :'amqp_url', queue = :'queue', declare = 'true')
  FORMAT JSON;

-- One row per sensor and 10-second window, emitted once, when the watermark passes the
-- window's end.
CREATE MATERIALIZED VIEW readings_per_window AS
    SELECT window_start, sensor, count(*) AS readings, sum(reading) AS total, max(reading) AS top
    FROM TUMBLE(readings, ts, INTERVAL '10' SECOND)
    GROUP BY window_start, window_end, sensor
    EMIT ON WINDOW CLOSE;

-- The closed windows as Parquet files under :out (a new file at least every second while rows
-- arrive).
CREATE SINK readings_archive FROM readings_per_window
    WITH (connector = 'parquet', path = :'sink_path', rollover = '1s');

SHOW SINKS;
