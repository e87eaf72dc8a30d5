"""The schema registry client every part of Accord uses, configured once."""

from __future__ import annotations

from confluent_kafka.schema_registry import SchemaRegistryClient

from streams.codec import AvroCodec, SchemaCache, registry_fetcher
from streams.settings import AccordSettings

# confluent-kafka's client waits forever by default; a request stuck on a dead
# keep-alive connection would then stall a consumer past its poll interval. A timeout
# turns that into a transport error, which the client retries with backoff.
REQUEST_TIMEOUT_S = 10
MAX_RETRIES = 4


def registry_client(settings: AccordSettings) -> SchemaRegistryClient:
    return SchemaRegistryClient(
        {
            "url": settings.registry,
            "timeout": REQUEST_TIMEOUT_S,
            "max.retries": MAX_RETRIES,
        }
    )


def registry_codec(settings: AccordSettings) -> AvroCodec:
    """A codec that fetches writer schemas from the registry (once each) by id."""
    return AvroCodec(SchemaCache(registry_fetcher(registry_client(settings))))
