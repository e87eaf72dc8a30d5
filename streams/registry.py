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
    config: dict[str, object] = {
        "url": settings.registry,
        "timeout": REQUEST_TIMEOUT_S,
        "max.retries": MAX_RETRIES,
    }
    auth = settings.registry_auth()
    if auth is not None:
        config["basic.auth.user.info"] = auth
    return SchemaRegistryClient(config)


def writer_schemas(settings: AccordSettings, client: SchemaRegistryClient) -> SchemaCache:
    """Writer schemas by id from `client`, retried and remembered as `settings.schemas` says."""
    schemas = settings.schemas
    return SchemaCache(
        registry_fetcher(client),
        attempts=schemas.fetch_attempts,
        backoff_s=schemas.fetch_backoff_s,
        missing_ttl_s=schemas.failed_id_ttl_s,
    )


def registry_codec(settings: AccordSettings) -> AvroCodec:
    """A codec that fetches writer schemas from the registry (once each) by id."""
    return AvroCodec(writer_schemas(settings, registry_client(settings)))
