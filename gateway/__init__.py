"""Order entry and market data: ZeroMQ (CURVE, msgpack) in front of the matcher's rings."""
