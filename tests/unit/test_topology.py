"""Which topics the worker makes before it starts, and how."""

from streams.settings import AccordSettings
from streams.topology import accord_topics, source_topics


def test_source_topics_are_made_as_their_connectors_would_make_them() -> None:
    specs = {spec.name: spec.partitions for spec in source_topics(AccordSettings())}
    assert specs == {
        "crm.public.customers": 3,
        "billing.billing.accounts": 3,
        "support.public.users": 3,
    }


def test_source_topics_are_not_accords_own() -> None:
    """`accord reset` deletes Accord's own topics; the captured sources must not be among them."""
    ours = {spec.name for spec in accord_topics(AccordSettings())}
    assert not ours & {spec.name for spec in source_topics(AccordSettings())}
