"""Unit tests: domain rules and adapters, no real I/O."""
