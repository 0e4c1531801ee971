"""Adapters for the ports that live in Redis (stores, throttle, config, projection)."""
