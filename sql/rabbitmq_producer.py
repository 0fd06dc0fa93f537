#!/usr/bin/env python3
"""Publishes sensor readings as JSON to a RabbitMQ queue, for sql/rabbitmq_to_parquet.sql.

Reading n is {"id": n, "sensor": "sensor-<n % 4>", "reading": n * n % 97, "ts": <start + n * 25 ms>}
(the time as ISO 8601 text in UTC). After the readings comes one more, a minute after the last:
it moves the source's watermark past every earlier window, so they all close and reach the
Parquet files. Every message is persistent and confirmed by RabbitMQ before the next is sent,
so none is lost once the script returns.

    python3 sql/rabbitmq_producer.py --count 2400

Needs pika (pip install pika).
"""

import argparse
import datetime
import json
import sys

import pika


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    parser.add_argument("--queue", default="readings")
    parser.add_argument("--count", type=int, default=2400, help="readings to publish")
    parser.add_argument("--start", default="2026-01-01T10:00:00", help="the first reading's time (UTC)")
    args = parser.parse_args()

    start = datetime.datetime.fromisoformat(args.start)
    step = datetime.timedelta(milliseconds=25)

    def reading(n: int, at: datetime.datetime) -> bytes:
        ts = at.isoformat(timespec="milliseconds") + "Z"
        return json.dumps({"id": n, "sensor": f"sensor-{n % 4}", "reading": n * n % 97, "ts": ts}).encode()

    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    # The same declaration as the source's declare = 'true' (a durable classic queue), so the
    # script works whether it or Weir runs first.
    channel.queue_declare(args.queue, durable=True)
    # Publisher confirms: basic_publish returns once RabbitMQ has the message on disk, and
    # raises if it could not be routed to the queue (mandatory).
    channel.confirm_delivery()
    persistent = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, content_type="application/json")
    for n in range(args.count):
        channel.basic_publish("", args.queue, reading(n, start + n * step), persistent, mandatory=True)
    last = start + (args.count - 1) * step
    channel.basic_publish(
        "", args.queue, reading(args.count, last + datetime.timedelta(minutes=1)), persistent, mandatory=True
    )
    connection.close()
    print(f"published {args.count} readings and one closing reading to queue {args.queue!r}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
