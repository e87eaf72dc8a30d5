"""The `accord` command. Thin: parse, call a plain function, render the result."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from streams.errors import AccordError
from streams.redact import redact
from streams.settings import AccordSettings, load_settings
from streams.topics import DecodedMessage

app = typer.Typer(
    help="Accord: customer master data in accord across your systems.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
stack_app = typer.Typer(
    help="The local stack: PostgreSQL, MariaDB, Redis, Kafka, registry, Kafka Connect.",
    no_args_is_help=True,
)
connectors_app = typer.Typer(
    help="Debezium source connectors from connectors/<system>/source.json.", no_args_is_help=True
)
schemas_app = typer.Typer(
    help="Canonical Avro schemas (schemas/*.avsc) against the schema registry.",
    no_args_is_help=True,
)
demo_app = typer.Typer(help="Sample data and the demo job.", no_args_is_help=True)
dlq_app = typer.Typer(
    help="Dead letters on the DLQ topic: list, show, replay.", no_args_is_help=True
)
app.add_typer(stack_app, name="stack")
app.add_typer(connectors_app, name="connectors")
app.add_typer(schemas_app, name="schemas")
app.add_typer(demo_app, name="demo")
app.add_typer(dlq_app, name="dlq")
identity_app = typer.Typer(help="Identity links in Redis.", no_args_is_help=True)
app.add_typer(identity_app, name="identity")
review_app = typer.Typer(
    help="Rows identity holds for review: list, show, accept, reject.", no_args_is_help=True
)
app.add_typer(review_app, name="review")

console = Console()
err = Console(stderr=True)


class _State:
    config: Path | None = None


def settings() -> AccordSettings:
    return load_settings(_State.config)


@app.callback()
def main(
    config: Annotated[
        Path | None,
        typer.Option(help="TOML config file (default ./accord.toml).", envvar="ACCORD_CONFIG"),
    ] = None,
) -> None:
    _State.config = config


def _progress(message: str) -> None:
    err.print(f"[dim]•[/dim] {message}")


# ------------------------------------------------------------------------------ stack


@stack_app.command("up")
def stack_up(
    components: Annotated[
        list[str] | None, typer.Argument(help="Only these (and their dependencies).")
    ] = None,
    brokers: Annotated[
        int | None,
        typer.Option(
            help="Kafka brokers; 3 gives each topic 3 copies (stack.kafka_brokers).", min=1, max=5
        ),
    ] = None,
) -> None:
    """Install what is missing, start everything, wait until healthy. Idempotent."""
    from streams.settings import StackSettings
    from streams.stack.manager import Stack

    current = settings()
    if brokers is not None:
        stack = StackSettings.model_validate({**dict(current.stack), "kafka_brokers": brokers})
        current = current.model_copy(update={"stack": stack})
    statuses = Stack(current, progress=_progress).up(components)
    _render_status([s.as_dict() for s in statuses])


@stack_app.command("status")
def stack_status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Each component: running, healthy, port, version, log. Exit 1 if any is unhealthy."""
    from streams.stack.manager import Stack

    statuses = [s.as_dict() for s in Stack(settings()).status()]
    if as_json:
        print(
            json.dumps(
                {"healthy": all(s["healthy"] for s in statuses), "components": statuses}, indent=2
            )
        )
    else:
        _render_status(statuses)
    if not all(s["healthy"] for s in statuses):
        raise typer.Exit(1)


@stack_app.command("down")
def stack_down() -> None:
    """Stop every component; no process of the stack remains."""
    from streams.stack.manager import Stack

    stopped = Stack(settings(), progress=_progress).down()
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


def _render_status(statuses: list[dict[str, object]]) -> None:
    table = Table("component", "state", "port", "version", "detail")
    for s in statuses:
        state = (
            "[green]healthy[/green]"
            if s["healthy"]
            else ("[yellow]unhealthy[/yellow]" if s["running"] else "[red]stopped[/red]")
        )
        table.add_row(str(s["name"]), state, str(s["port"]), str(s["version"]), str(s["detail"]))
    console.print(table)


# ------------------------------------------------------------------------- connectors


@connectors_app.command("apply")
def connectors_apply(
    systems: Annotated[
        list[str] | None, typer.Argument(help="crm, billing, support (default: all).")
    ] = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for RUNNING (0: don't).")] = 90.0,
) -> None:
    """Create or update connectors through the Kafka Connect REST API."""
    from streams.demo import apply_connectors

    states = apply_connectors(settings(), systems, wait_s=wait)
    _render_connectors(states)


@connectors_app.command("status")
def connectors_status(
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Connector and task state as Kafka Connect reports it."""
    from streams.connect import SYSTEMS, ConnectClient, load_connector

    current = settings()
    client = ConnectClient.of(current)
    states = [
        client.state(load_connector(current.connectors_dir, s).name).as_dict() for s in SYSTEMS
    ]
    if as_json:
        print(json.dumps(states, indent=2))
    else:
        _render_connectors(states)
    if not all(s["running"] for s in states):
        raise typer.Exit(1)


@connectors_app.command("resnapshot")
def connectors_resnapshot(
    system: Annotated[str, typer.Argument(help="crm, billing or support.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Read a source again from scratch: the way back after its replication slot was
    lost (PostgreSQL) or its binlog purged (MariaDB).

    Debezium forgets its offsets, snapshots every captured table and streams on from a new
    slot. Rows Accord already holds merge as no-ops; rows changed while the slot was gone
    arrive as snapshot reads.
    """
    from streams.connect import ConnectClient, load_connector

    current = settings()
    connector = load_connector(current.connectors_dir, system)
    if not yes:
        typer.confirm(
            f"Re-snapshot {connector.name}? Every row of {system} is read again.", abort=True
        )
    console.print(f"{connector.name}: stopping, clearing offsets, resuming")
    ConnectClient.of(current).resnapshot(connector.name)
    console.print(
        f"{connector.name}: snapshot running; watch it with `accord monitor` "
        f"(slot {connector.config.get('slot.name', '-')})"
    )


def _render_connectors(states: list[dict[str, object]]) -> None:
    table = Table("connector", "state", "tasks", "error")
    for s in states:
        colour = "green" if s["running"] else "red"
        table.add_row(
            str(s["name"]),
            f"[{colour}]{s['state']}[/{colour}]",
            ", ".join(s["tasks"]) or "-",
            str(s["trace"] or ""),
        )  # type: ignore[arg-type]
    console.print(table)


# ---------------------------------------------------------------------------- schemas

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _workflows():
    from streams.registry import registry_client
    from streams.schemas import SchemaWorkflows

    current = settings()
    return SchemaWorkflows(current, registry_client(current))


def _render_schemas(reports: list, as_json: bool, failing: tuple[str, ...] = ()) -> None:
    if as_json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        table = Table(
            Column("subject", overflow="fold"),
            Column("schema", overflow="fold"),
            "state",
            "compatibility",
            "versions",
        )
        for r in reports:
            colour = "red" if r.state in failing else "green"
            table.add_row(
                r.subject,
                r.schema,
                f"[{colour}]{r.state}[/{colour}]",
                r.level,
                ", ".join(map(str, r.versions)) or "-",
            )
        console.print(table)
        for r in reports:
            if r.explanation:
                console.print(f"[bold]{r.subject}[/bold] ({r.state})")
                for line in r.explanation:
                    console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    if any(r.state in failing for r in reports):
        raise typer.Exit(1)


@schemas_app.command("list")
def schemas_list(as_json: JsonOption = False) -> None:
    """Every subject in the registry: versions, latest schema, compatibility level."""
    _render_schemas(_workflows().list(), as_json)


@schemas_app.command("check")
def schemas_check(as_json: JsonOption = False) -> None:
    """Are the local schemas compatible with what is registered? Exit 1, with reasons, if not."""
    _render_schemas(_workflows().check(), as_json, failing=("incompatible",))


@schemas_app.command("push")
def schemas_push(as_json: JsonOption = False) -> None:
    """Register new versions; refuse the whole push if any schema is incompatible."""
    _render_schemas(_workflows().push(), as_json, failing=("incompatible", "refused"))


@schemas_app.command("diff")
def schemas_diff(as_json: JsonOption = False) -> None:
    """Local schemas against the latest registered versions, field by field."""
    _render_schemas(_workflows().diff(), as_json)


# ----------------------------------------------------------------------------- worker


@app.command("worker")
def worker(
    loglevel: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the stream worker (ingest, merge, emit) until stopped with Ctrl-C or SIGTERM."""
    from streams.app import run_worker

    run_worker(settings(), loglevel)


@app.command("sink")
def sink(
    target: Annotated[
        str, typer.Option("--target", help="The system to write into (crm, billing, support).")
    ],
    metrics_port: Annotated[
        int, typer.Option(help="Serve Prometheus metrics on this loopback port (0: don't).")
    ] = 0,
    webhook_deadline: Annotated[
        float, typer.Option(help="Seconds a webhook event is retried before the DLQ.")
    ] = 300.0,
) -> None:
    """Apply accord.sink.<target> to the target until stopped with Ctrl-C or SIGTERM."""
    from streams.sinks import run_sink

    run_sink(settings(), target, metrics_port or None, webhook_deadline)


@app.command("reset")
def reset_app(
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Start the app over: delete its topics, groups, Redis keys, state and ledger rows.

    Sources and raw topics are kept: the next worker rebuilds everything from them.
    """
    from streams.reset import reset

    current = settings()
    if not yes:
        typer.confirm(
            f"Delete every output and all state of Accord app {current.worker.app_id!r}?",
            abort=True,
        )
    report = reset(current, _progress)
    console.print(
        f"reset app {current.worker.app_id!r}: {len(report.topics)} topics, "
        f"{len(report.groups)} consumer groups, {report.redis_keys} Redis keys, ledger rows "
        + ", ".join(f"{t}: {n}" for t, n in report.ledger_rows.items())
    )


@app.command("monitor")
def monitor(
    once: Annotated[bool, typer.Option("--once", help="One snapshot, then exit.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON (with --once).")] = False,
    interval: Annotated[
        float, typer.Option(min=0.2, help="Seconds between refreshes (and rate samples).")
    ] = 2.0,
) -> None:
    """Live view of the source and Accord topics, each consumer group's lag per partition,
    the DLQ, the connectors and the replication slots. Ctrl-C to leave."""
    from rich.live import Live

    from streams.monitor import Monitor

    current = settings()
    watcher = Monitor(current)
    try:
        watcher.snapshot(connectors=False, slots=False)  # first offsets, so rates have a base
        if once:
            time.sleep(interval)  # sampling period of the rates, not a synchronisation
            snapshot = watcher.snapshot()
            if json_out:
                print(json.dumps(snapshot.as_dict(), indent=2))
            else:
                console.print(_render_monitor(snapshot, current.worker.app_id))
            return
        with Live(console=console, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(_render_monitor(watcher.snapshot(), current.worker.app_id))
                live.refresh()
    except ConnectionError as exc:
        raise AccordError(f"{exc}\n  is the stack up? `accord stack status`") from exc
    except KeyboardInterrupt:
        pass
    finally:
        watcher.close()


def _render_monitor(snapshot: Any, app_id: str) -> Any:
    from rich.console import Group
    from rich.markup import escape

    topics = Table("topic", "kind", "partitions", "messages", "msg/s", title="Topics")
    for t in snapshot.topics:
        rate = "-" if t.rate_per_s is None else f"{t.rate_per_s:,.1f}"
        held = f"{t.messages:,}" if t.exists else "(not created)"
        topics.add_row(t.topic, t.kind, str(t.partitions), held, rate)
    groups = Table(
        "group / partition", "committed", "end", "lag", "owner",
        title=f"Consumer groups of app {app_id}",
    )  # fmt: skip
    for g in snapshot.groups:
        header = f"[bold]{g.group}[/bold] {g.state.lower()}, {g.members} members"
        groups.add_row(header, "", "", f"[bold]{g.lag:,}[/bold]", "")
        for p in g.partitions:
            committed = "-" if p.committed is None else f"{p.committed:,}"
            groups.add_row(
                f"  {p.topic}[{p.partition}]", committed, f"{p.end_offset:,}", f"{p.lag:,}",
                p.owner or "(unassigned)", style="yellow" if p.lag else None,
            )  # fmt: skip
    connectors = Table("connector", "state", "tasks", "detail", title="Connectors")
    for c in snapshot.connectors:
        style = None if c.state == "RUNNING" and all(t == "RUNNING" for t in c.tasks) else "red"
        connectors.add_row(c.name, c.state, ", ".join(c.tasks) or "-", c.detail or "", style=style)
    slots = Table(
        "system", "slot", "active", "WAL held (bytes)", "WAL status", title="Replication slots"
    )
    for s in snapshot.slots:
        held = "-" if s.lag_bytes is None else f"{s.lag_bytes:,}"
        status = s.wal_status or "-"
        if s.wal_status in ("missing", "lost"):
            status = f"[red]{s.wal_status}[/red]: accord connectors resnapshot {s.system}"
        slots.add_row(s.system, s.slot, "yes" if s.active else "no", held, status)
    growth = "-" if snapshot.dlq_growth_per_s is None else f"{snapshot.dlq_growth_per_s:+.1f}/s"
    dlq = f"[bold]DLQ[/bold]: {snapshot.dlq_size:,} entries ({growth})"
    paused = [
        f"[red bold]{p.target} paused[/red bold]"
        + ("" if p.since is None else time.strftime(" since %H:%M:%S", time.localtime(p.since)))
        + f": {escape(p.reason)}"
        for p in snapshot.paused
    ]
    missing = [
        f"[yellow bold]{m.system}: mapped column {escape(m.column)!r} missing[/yellow bold] "
        f"from its rows (last seen {time.strftime('%H:%M:%S', time.localtime(m.last_seen))}): "
        f"its field is not synced from {m.system}"
        for m in snapshot.missing_columns
    ]
    return Group(topics, groups, connectors, slots, dlq, *paused, *missing)


@app.command("reconcile")
def reconcile_systems(
    system: Annotated[
        list[str] | None, typer.Option("--system", help="Only this target (repeatable).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    details: Annotated[int, typer.Option(help="Drifts listed per target.")] = 20,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Send each drifted row a correction through the merge (a new revision, "
            "applied only if the row still holds what was read).",
        ),
    ] = False,
) -> None:
    """Compare every SQL target's rows with the golden records, field by field: checked,
    in accord, drifted, missing, orphaned. Exits 1 when anything drifted or is missing
    (with --repair: when anything is missing or a drifted row got no repair request)."""
    from streams.reconcile import reconcile

    try:
        with err.status("reconciling") as status:
            cards = reconcile(
                settings(), system, progress=_quiet if json_out else status.update, repair=repair
            )
    except ValueError as exc:
        raise AccordError(str(exc)) from exc
    if json_out:
        print(json.dumps([c.as_dict(details) for c in cards], indent=2, default=str))
    else:
        table = Table("system", "checked", "in accord", "drifted", "missing", "orphaned")
        for card in cards:
            row = card.as_dict(0)
            table.add_row(
                *(str(row[k]) for k in ("target", "checked", "in_accord", "drifted", "missing")),
                str(row["orphaned"]),
            )
        console.print(table)
        for card in cards:
            for drift in card.drifts[:details]:
                console.print(
                    f"{card.target} {drift.key} ({drift.golden_id}): {drift.field} is "
                    f"{drift.target_value!r}, golden {drift.golden!r}",
                    markup=False,
                )
        if repair:
            sent = sum(card.repairs_requested for card in cards)
            console.print(f"{sent} repair requests sent; run reconcile again to see them applied")
    unrepaired = [c.drifted - (c.repairs_requested if repair else 0) for c in cards]
    if any(c.missing for c in cards) or any(n > 0 for n in unrepaired):
        raise typer.Exit(1)


@identity_app.command("rebuild")
def identity_rebuild(
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    rekey: Annotated[
        bool,
        typer.Option(
            "--rekey",
            help="Delete every match key first and remake them with the configured "
            "identity.key_secret (after changing it; stop the workers first).",
        ),
    ] = False,
) -> None:
    """Rebuild the identity keys in Redis (xrefs, links, match keys) from the golden
    changelog and the appliers' ledgers. Workers do this by themselves when Redis lost
    them; ingest pauses while it runs."""
    from streams.app import redis_client
    from streams.relink import EPOCH_KEY, read_epoch, rebuild_now

    current = settings()
    epoch = read_epoch(redis_client(current), current.worker.redis_prefix + EPOCH_KEY)
    if not yes:
        state = (
            f"intact since {epoch.get('at')} ({epoch.get('how')})"
            if epoch
            else "missing (Redis lost them)"
        )
        typer.confirm(
            f"Identity keys of app {current.worker.app_id!r} are {state}. Rebuild them now? "
            "Ingest pauses until it is done.",
            abort=True,
        )
    report = rebuild_now(current, _progress, rekey=rekey)
    console.print(report.describe())


@identity_app.command("migrate-keys")
def identity_migrate_keys() -> None:
    """Rename the clear-text match keys of earlier versions (`<prefix>match:{field}:{value}`)
    to keyed hashes (`<prefix>hmatch:{field}:{digest}`). Safe to rerun and to run beside
    workers (each key moves atomically); workers also do it when they start."""
    from streams.app import redis_client
    from streams.matchkeys import MatchKeys, check_secret, migrate_legacy_keys

    current = settings()
    keys = MatchKeys(current.worker.redis_prefix, current.match_key_secret())
    client = redis_client(current)
    check_secret(client, keys)
    _progress(f"scanning for clear-text match keys under {keys.prefix!r}")
    report = migrate_legacy_keys(client, keys, _progress)
    console.print(
        report.describe() if report.scanned else "no clear-text match keys: nothing to do"
    )
    if report.conflicts:
        raise typer.Exit(1)


def _quiet(_message: str) -> None:
    pass


@dlq_app.command("list")
def dlq_list(
    reason: Annotated[str | None, typer.Option(help="Only this reason.")] = None,
    system: Annotated[
        str | None, typer.Option(help="Only letters from this system's raw topic.")
    ] = None,
    topic: Annotated[str | None, typer.Option(help="Only letters from this topic.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Only letters first seen at or after (ISO 8601, UTC).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Dead letters, oldest first: where each is on the DLQ (partition:offset, for
    `accord dlq show`), where it came from, and why."""
    import datetime as dt

    from streams.dlq import read_dead_letters
    from streams.topics import RAW_TOPICS

    if system is not None and system not in RAW_TOPICS:
        raise AccordError(f"unknown system {system!r}; known: {', '.join(RAW_TOPICS)}")
    if system is not None:
        topic = RAW_TOPICS[system]
    try:
        after = dt.datetime.fromisoformat(since) if since else None
    except ValueError as exc:
        raise AccordError(f"--since {since!r} is not an ISO 8601 time") from exc
    if after is not None and after.tzinfo is None:
        after = after.replace(tzinfo=dt.UTC)
    letters = read_dead_letters(settings(), reason, topic, after)
    if json_out:
        print(json.dumps([letter.as_dict() for letter in letters], indent=2, default=str))
        return
    table = Table("at", "first seen", "from", "reason", "detail")
    for stored in letters:
        letter = stored.as_dict()
        table.add_row(
            letter["at"],
            str(letter["first_seen"])[:19],
            f"{letter['topic']} {letter['partition']}:{letter['offset']}",
            letter["reason"],
            escape(_clip(letter["detail"], 60)),
        )
    console.print(table)
    console.print(f"{len(letters)} dead letter(s)")


@dlq_app.command("show")
def dlq_show(
    at: Annotated[str, typer.Argument(help="The letter's PARTITION:OFFSET on the DLQ topic.")],
) -> None:
    """One dead letter in full (JSON), with its payload decoded when it can be."""
    from streams.dlq import read_dead_letters
    from streams.registry import registry_codec

    current = settings()
    found = [letter for letter in read_dead_letters(current) if letter.coordinates == at]
    if not found:
        raise AccordError(f"no dead letter at {at} on {current.topics.dlq}")
    letter = found[0].as_dict()
    codec = registry_codec(current)
    try:
        letter["value_decoded"] = codec.decode(found[0].letter["value"] or b"").value
    except Exception as exc:  # the reason it is a dead letter, most likely
        letter["value_decoded"] = None
        letter["value_not_decodable"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(letter, indent=2, default=str))


@dlq_app.command("replay")
def dlq_replay(
    at: Annotated[
        list[str] | None, typer.Argument(help="PARTITION:OFFSET of letters on the DLQ.")
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Every letter with this reason.")] = None,
    topic: Annotated[str | None, typer.Option(help="Every letter from this topic.")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Send dead letters back to their original topic after a fix, each at most once."""
    from confluent_kafka import Producer

    from streams.app import redis_client
    from streams.dlq import read_dead_letters, replay

    if not at and reason is None and topic is None:
        raise AccordError("say which letters: PARTITION:OFFSET arguments, --reason or --topic")
    current = settings()
    letters = read_dead_letters(current, reason, topic)
    if at:
        letters = [letter for letter in letters if letter.coordinates in set(at)]
        missing = sorted(set(at) - {letter.coordinates for letter in letters})
        if missing:
            raise AccordError(f"no dead letter at {', '.join(missing)} on {current.topics.dlq}")
    if not letters:
        console.print("no dead letters match")
        return
    if not yes:
        typer.confirm(f"Replay {len(letters)} dead letter(s) to their original topics?", abort=True)
    report = replay(
        current,
        letters,
        redis_client(current),
        Producer(current.kafka_config({"enable.idempotence": True})),
    )
    console.print(
        f"replayed {len(report.replayed)}, skipped {len(report.skipped)} replayed before"
        + (f": {', '.join(report.skipped)}" if report.skipped else "")
    )
    if report.refused:
        console.print(
            f"refused {len(report.refused)} not replayable (truncated, or an emitter's): "
            + ", ".join(report.refused)
        )


@app.command("explain")
def explain_record(
    who: Annotated[
        str, typer.Argument(help="An email address, a golden id, or a source row as system:key.")
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Why a golden record holds what it holds: per field, its source, the rule that chose
    it, the values that lost and why, and the field's history from accord.audit. A source
    row that identity holds instead of linking is reported with why it is held."""
    from streams.app import redis_client
    from streams.explain import (
        describe_hold,
        explain,
        held_for,
        hold_as_dict,
        read_audit,
        read_state,
    )
    from streams.identity import IdentityResolver
    from streams.model import SYSTEMS
    from streams.reconcile import golden_records
    from streams.registry import registry_codec
    from streams.rules import load_rules
    from streams.topology import changelog_topic

    current = settings()
    rules = load_rules(current.worker.rules_file)
    # Reads xrefs and holds only: never a match key, so no match rules (nor their secret).
    identity = IdentityResolver(redis_client(current), current.worker.redis_prefix, ())

    def print_held(holds: tuple[Any, ...]) -> None:
        if json_out:
            print(json.dumps({"golden_id": None, "held": [hold_as_dict(h) for h in holds]}))
            return
        for hold in holds:
            console.print(escape(describe_hold(hold)))

    golden_id = who
    address = None
    system, colon, key = who.partition(":")
    if colon and system in SYSTEMS:
        hold = identity.held(system, key)
        if hold is not None:
            print_held((hold,))
            return
        found = identity.lookup(system, key)
        if found is None:
            raise AccordError(f"{who} is neither linked to a golden record nor held")
        golden_id = found
    elif "@" in who:
        address = who
        matches = [
            gid
            for gid, record in golden_records(current).items()
            if (record["fields"].get("email") or "").lower() == who.strip().lower()
        ]
        if not matches:
            held = held_for(identity.holds(), address=who)
            if held:
                print_held(held)
                return
            raise AccordError(f"no golden record has the email {who!r}, and no row is held for it")
        if len(matches) > 1:
            raise AccordError(f"{len(matches)} golden records have {who!r}: {', '.join(matches)}")
        golden_id = matches[0]
    state = read_state(current.kafka_config(), changelog_topic(current), golden_id)
    if state is None:
        raise AccordError(f"no golden record {golden_id!r} in {changelog_topic(current)}")
    codec = registry_codec(current)
    audit = read_audit(
        current.kafka_config(), current.topics.audit, golden_id, lambda raw: codec.decode(raw).value
    )
    held = held_for(identity.holds(), golden_id=golden_id, address=address)
    result = explain(state, rules, audit, held).as_dict()
    if json_out:
        print(json.dumps(result, indent=2, default=str))
        return
    console.print(
        f"[bold]{result['golden_id']}[/bold] version {result['version']}, "
        f"{'active' if result['active'] else 'inactive'}, linked to {', '.join(result['links'])}"
    )
    if result["merged_into"]:
        console.print(f"merged into {result['merged_into']} (accord merge): explain that one")
        return
    for hold in held[:10]:
        console.print(escape(describe_hold(hold)))
    if len(held) > 10:
        console.print(f"... and {len(held) - 10} more held rows (--json lists them all)")
    table = Table("field", "value", "from", "rule", "lost", "changes")
    for entry in result["fields"]:
        if entry["system"] is None and not entry["lost"]:
            continue
        source = ""
        if entry["system"]:
            source = f"{entry['system']} {entry['key']}\n{entry['source_time']}"
            if entry["clamped_from"]:
                source += f"\n(clock ahead: stated {entry['clamped_from']}, clamped)"
        lost = "\n".join(
            f"{loser['value']!r} from {loser['system']}: {loser['why']}"
            for loser in entry["lost"]
            if loser["value"] is not None  # a row without a value is no contender
        )
        changes = str(len(entry["history"]))
        table.add_row(
            entry["name"], escape(repr(entry["value"])), escape(source), entry["rule"],
            escape(lost), changes,
        )  # fmt: skip
    console.print(table)


# ----------------------------------------------------------------------------- review

RowArgument = Annotated[str, typer.Argument(help="The held source row, as system:key.")]


def _review_row(row: str) -> str:
    from streams.model import SYSTEMS

    system, colon, key = row.partition(":")
    if not colon or not key:
        raise AccordError(f"{row!r} is not a source row: write it as system:key")
    if system not in SYSTEMS:
        raise AccordError(f"unknown system {system!r} in {row!r}; known: {', '.join(SYSTEMS)}")
    return row


@review_app.command("list")
def review_list(
    reason: Annotated[str | None, typer.Option(help="Only holds with this reason.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Rows in the table (--json: all).")] = 50,
    json_out: JsonOption = False,
) -> None:
    """Every held row, oldest first: why it is held, its candidate record, since when."""
    from streams.review import now_ms, reviewer_of

    now = now_ms()
    holds = [h for h in reviewer_of(settings()).holds() if reason in (None, h.reason)]
    holds.sort(key=lambda hold: (hold.since_ms, hold.link))
    if json_out:
        print(json.dumps([hold.as_dict(now) for hold in holds], indent=2, default=str))
        return
    table = Table("row", "reason", "candidate", "held since", "changes since", "why")
    for hold in holds[:limit]:
        row = hold.as_dict(now)
        table.add_row(
            escape(hold.link), hold.reason, hold.golden_id or "-", str(row["since"]),
            str(row["changes_since"]), escape(hold.describe()),
        )  # fmt: skip
    console.print(table)
    more = f", the {limit} oldest shown (--limit, --json)" if len(holds) > limit else ""
    console.print(f"{len(holds)} held row(s){more}")


@review_app.command("show")
def review_show(row: RowArgument, json_out: JsonOption = False) -> None:
    """One held row: its hold, and the change kept for the decision (values, commit
    time, where it came from); or the decision taken on it."""
    from streams.review import NotHeld, change_to_json, now_ms, reviewer_of

    link = _review_row(row)
    reviewer = reviewer_of(settings())
    hold, record = reviewer.hold(link), reviewer.record(link)
    linked_to = reviewer.linked_to(link)
    if hold is None and (record is None or record.kind != "decision"):
        if linked_to is not None:
            raise AccordError(f"{link} is not held: it is linked to golden record {linked_to}")
        raise NotHeld(link)
    shown: dict[str, Any] = {"row": link, "held": hold is not None, "linked_to": linked_to}
    if hold is not None:
        shown["hold"] = hold.as_dict(now_ms())
    if record is not None:
        shown["kept_change"] = change_to_json(record.change) if record.change else None
        shown["origin"] = record.origin.__dict__ if record.origin else None
        if record.kind == "decision":
            shown["decision"] = {
                "decision": record.decision.value if record.decision else None,
                "golden_id": record.golden_id,
                "by": record.by,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.at_ms / 1000)),
                "replayed": record.replayed,
            }
    if json_out:
        print(json.dumps(shown, indent=2, default=str))
        return
    if hold is not None:
        console.print(f"[bold]{escape(link)}[/bold] is held: {escape(hold.describe())}")
        console.print(f"held since {shown['hold']['since']}, {shown['hold']['changes_since']} "
                      "change(s) since")  # fmt: skip
    if "decision" in shown:
        d = shown["decision"]
        console.print(
            f"[bold]{escape(link)}[/bold]: {d['decision']}ed by {d['by']} at {d['at']}, "
            f"linked to {d['golden_id']}"
        )
    change = shown.get("kept_change")
    if change is None:
        console.print("no change kept for it (held before the review topic existed): it "
                      "syncs with its next change once decided")  # fmt: skip
        return
    table = Table("field", "value", title="Its latest change, kept for the decision")
    for name, value in change["values"].items():
        table.add_row(name, escape(repr(value)))
    console.print(table)
    origin = shown.get("origin") or {}
    console.print(
        f"committed {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(change['source_ts'] / 1e6))}"
        f" at {change['position']}; from {origin.get('topic')} "
        f"{origin.get('partition')}:{origin.get('offset')}"
    )


def _decide(row: str, decision_name: str, golden: str | None, json_out: bool) -> None:
    from streams.review import Decision, ReviewRefused, reviewer_of

    link = _review_row(row)
    decision = Decision(decision_name)
    try:
        outcome = reviewer_of(settings()).decide(link, decision, golden)
    except ReviewRefused as exc:
        if json_out:
            print(json.dumps({"row": link, "decision": decision.value, "refused": exc.reason}))
            err.print(f"[red]error:[/red] {escape(str(exc))}")
            raise typer.Exit(1) from exc
        raise
    if json_out:
        print(json.dumps(outcome.as_dict(), indent=2))
        return
    if outcome.already:
        console.print(f"{link} was decided before ({outcome.decision.value}, by {outcome.by}): "
                      f"linked to {outcome.golden_id}; nothing to do")  # fmt: skip
        return
    sent = (
        "its last change was sent to the merge"
        if outcome.replayed
        else "no change was kept for it: it syncs with its next change"
    )
    console.print(
        f"{outcome.decision.value}ed {link} (by {outcome.by}): linked to golden record "
        f"{outcome.golden_id}, which links {outcome.rows} row(s); {sent}"
    )


@review_app.command("accept")
def review_accept(
    row: RowArgument,
    golden: Annotated[
        str | None,
        typer.Option(
            "--golden",
            help="Link it to this golden record instead of the hold's candidate (needed "
            "for a role-address hold, which has none).",
        ),
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Link a held row to its candidate record (or --golden) and send its last change to
    the merge. Refused, with the reason, when that record is at identity.max_rows_per_record."""
    _decide(row, "accept", golden, json_out)


@review_app.command("reject")
def review_reject(row: RowArgument, json_out: JsonOption = False) -> None:
    """Give a held row its own golden record and send its last change to the merge; it is
    not held again for that candidate."""
    _decide(row, "reject", None, json_out)


# ------------------------------------------------------------------------------ merge


@app.command("merge")
def merge(
    survivor: Annotated[str, typer.Argument(help="The golden id that stays.")],
    loser: Annotated[str, typer.Argument(help="The golden id merged into it.")],
    json_out: JsonOption = False,
) -> None:
    """Merge two golden records found to be one customer: LOSER's rows join SURVIVOR,
    whose fields are recomputed from all rows and synced to every target; LOSER becomes
    a tombstone whose `merged_into` points at SURVIVOR. Refused, with the reason, past
    identity.max_rows_per_record. Run it again to finish a run that was cut short.

    Example: accord merge 2daf08e3-6b7a-5dfa-b2c9-c3fd2da7e923 9c1e0b8a-5a0f-5d36-8f7e-4f1f0e2d9a11
    """
    from streams.identity import MergeRefused
    from streams.merging import merger_of

    try:
        outcome = merger_of(settings()).merge(survivor, loser)
    except MergeRefused as exc:
        if json_out:
            print(json.dumps({"survivor": survivor, "loser": loser, "refused": exc.reason}))
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    if json_out:
        print(json.dumps(outcome.as_dict(), indent=2))
        return
    moved = ", ".join(outcome.moved) or "none this time (moved before)"
    console.print(
        f"merged {loser} into {survivor} (by {outcome.by}): rows moved: {escape(moved)}; "
        f"{survivor} links {outcome.rows} row(s). The worker recomputes it and syncs "
        "every target; follow it on accord.golden."
    )


# ------------------------------------------------------------------------------- demo


@demo_app.command("seed")
def demo_seed(
    count: Annotated[int, typer.Option(min=1, help="Customers to generate.")] = 50,
    seed_value: Annotated[int, typer.Option("--seed", help="Generator seed.")] = 7,
    start: Annotated[int, typer.Option(min=0, help="First customer index.")] = 0,
) -> None:
    """Load generated, deliberately messy customers into crm, billing and support."""
    from streams.demo import seed

    inserted = seed(settings(), count, seed_value, start)
    console.print(
        "inserted: "
        + ", ".join(f"{k} {v}" for k, v in inserted.items())
        + " (existing keys are skipped)"
    )


@demo_app.command("run")
def demo_run(
    count: Annotated[int, typer.Option(min=1, help="Sample customers to seed.")] = 50,
    timeout: Annotated[
        float,
        typer.Option(
            help="Seconds to wait for each step; while the worker catches up on a backlog, "
            "seconds in which it reads nothing."
        ),
    ] = 180.0,
) -> None:
    """The main job: stack up, seed, run the worker, edit each system, watch the others follow."""
    from streams.demo import apply_connectors, percentile, run_sync_demo
    from streams.stack.manager import Stack

    current = settings()
    _progress("bringing the stack up (first run installs and downloads)")
    Stack(current, progress=_progress).up()
    _progress("applying Debezium connectors")
    _render_connectors(apply_connectors(current))
    report = run_sync_demo(current, count, _progress, timeout_s=timeout)

    targets = [str(card["target"]) for card in report.scorecards]
    table = Table(
        "edit",
        *[Column(t, justify="right") for t in targets],
        title="An edit in one system, applied in every other (source commit -> applied)",
    )
    for edit in report.edits:
        cells = []
        for target in targets:
            if target in edit.system.split("+"):
                cells.append("[dim]source[/dim]")
                continue
            latency = edit.latency_ms.get(target, "")
            cells.append(
                f"{latency:.0f} ms" if isinstance(latency, float) else f"[dim]{latency}[/dim]"
            )
        table.add_row(
            f"[bold]{edit.system}[/bold]: {edit.title}\n  -> {edit.field} = {edit.value!r}", *cells
        )
    console.print(table)

    cards = Table("system", "checked", "in accord", "drifted", "missing", title="Reconcile")
    for card in report.scorecards:
        cards.add_row(
            *(str(card[k]) for k in ("target", "checked", "in_accord", "drifted", "missing"))
        )
    console.print(cards)
    samples = [ms for values in report.latencies_ms.values() for ms in values]
    if samples:
        console.print(
            f"{len(samples)} applies of the edits above: commit -> applied median "
            f"{percentile(samples, 0.5):.0f} ms, p99 {percentile(samples, 0.99):.0f} ms"
        )
        figures = current.stack.state_dir / "reports" / "demo-latency.json"
        figures.parent.mkdir(parents=True, exist_ok=True)
        figures.write_text(
            json.dumps(
                {
                    "applies": len(samples),
                    "median_ms": round(percentile(samples, 0.5), 1),
                    "p99_ms": round(percentile(samples, 0.99), 1),
                    "by_target_ms": report.latencies_ms,
                },
                indent=2,
            )
            + "\n"
        )
        console.print(f"[dim]figures: {figures}[/dim]")
    console.print("[green]every system holds the golden records[/green]")


@demo_app.command("trace")
def demo_trace(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for events.")] = 90.0,
) -> None:
    """The capture half alone: change a row in each system and show its decoded CDC event."""
    from streams.demo import trace_changes

    changes = trace_changes(settings(), _progress, timeout_s=timeout)
    table = Table(
        "system",
        "op",
        "key",
        "schema id",
        "row",
        "commit→topic",
        title="Source changes arriving on Kafka, decoded via the registry",
    )
    for change in changes:
        event = change.event
        if event is None:
            table.add_row(change.system, change.op, change.key, "", "[red]not seen[/red]", "")
            continue
        table.add_row(
            change.system,
            event.op or "",
            _clip(change.key, 14),
            str(event.schema_id),
            _salient(change.op, event),
            f"{change.latency_ms:.0f} ms",
        )
    console.print(table)
    missing = [c for c in changes if c.event is None]
    if missing:
        err.print(f"[red]{len(missing)} change(s) did not arrive within {timeout:.0f}s[/red]")
        raise typer.Exit(1)
    console.print(
        f"[green]all {len(changes)} changes arrived as decoded Debezium envelopes[/green]"
    )


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _salient(op: str, event: DecodedMessage) -> str:
    """The column a change is about: what a create set, what an update changed."""
    if op == "d":
        return "(deleted)"
    value = event.value or {}
    before, after = value.get("before") or {}, value.get("after") or {}
    changed = {k: v for k, v in after.items() if before.get(k) != v and k != "updated_at"}
    for column in ("email", "contact_email", "phone", "status", "tier"):
        if column in changed:
            return _clip(f"{column}={changed[column]!r}", 40)
    return _clip(", ".join(f"{k}={v!r}" for k, v in changed.items()), 40)


def run() -> None:
    """Entry point: expected failures print one clear line, never a stack trace."""
    try:
        app()
    except AccordError as exc:
        _fail(str(exc))
    except Exception as exc:
        if os.environ.get("ACCORD_DEBUG"):
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (ACCORD_DEBUG=1 shows the traceback)")


def _fail(message: str) -> None:
    if not os.environ.get("ACCORD_DEBUG"):  # debugging shows values as they are
        message = redact(message)
    err.print("[red]error:[/red]", end=" ")
    err.print(message, markup=False, highlight=False, soft_wrap=True)
    sys.exit(1)


if __name__ == "__main__":
    run()
