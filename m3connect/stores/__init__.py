"""Store adapters. Each imports its database client only when used, so the core stays
importable without any of them."""

from m3connect.stores.memory import InMemoryStore

__all__ = ["InMemoryStore"]
