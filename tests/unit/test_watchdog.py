"""The connector watchdog: failed tasks and hung ones (no heartbeat) are restarted."""

from streams.connect import ConnectorFile, ConnectorState, ConnectorWatchdog


class Connect:
    """Connect's REST API as the watchdog sees it: states in, restarts out."""

    def __init__(self, states: dict[str, ConnectorState]) -> None:
        self.states = states
        self.restarted: list[tuple[str, bool]] = []

    def state(self, name: str) -> ConnectorState:
        return self.states[name]

    def restart(self, name: str, only_failed: bool = False) -> None:
        self.restarted.append((name, only_failed))


CRM = ConnectorFile("crm", "accord-crm-source", {"topic.prefix": "crm"})


def running() -> ConnectorState:
    return ConnectorState("accord-crm-source", "RUNNING", ["RUNNING"], None)


def test_a_failed_task_is_restarted() -> None:
    connect = Connect({CRM.name: ConnectorState(CRM.name, "RUNNING", ["FAILED"], "boom")})
    ConnectorWatchdog(connect, [CRM], lambda topic: 0).check(now=0)
    assert connect.restarted == [(CRM.name, True)]


def test_a_connector_whose_heartbeat_stops_is_restarted_once_per_stall() -> None:
    connect = Connect({CRM.name: running()})
    ends = {"__debezium-heartbeat.crm": 5}
    watchdog = ConnectorWatchdog(connect, [CRM], ends.__getitem__, stall_s=60)
    watchdog.check(now=0)
    watchdog.check(now=59)
    assert connect.restarted == []
    watchdog.check(now=61)
    assert connect.restarted == [(CRM.name, False)]
    watchdog.check(now=90)  # the clock starts again after a restart
    assert len(connect.restarted) == 1


def test_a_growing_heartbeat_keeps_it_alive() -> None:
    connect = Connect({CRM.name: running()})
    ends = {"__debezium-heartbeat.crm": 0}
    watchdog = ConnectorWatchdog(connect, [CRM], ends.__getitem__, stall_s=60)
    for now in range(0, 300, 30):
        ends["__debezium-heartbeat.crm"] += 1
        watchdog.check(now=now)
    assert connect.restarted == []


def test_a_broker_that_is_away_does_not_stop_the_watchdog() -> None:
    from confluent_kafka import KafkaError, KafkaException

    checks: list[int] = []

    def end_while_the_broker_restarts(topic: str) -> int:
        checks.append(1)
        if len(checks) < 3:
            raise KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION))
        return 0

    watchdog = ConnectorWatchdog(
        Connect({CRM.name: running()}), [CRM], end_while_the_broker_restarts, interval_s=0.001
    )

    class StopAfterThree:
        def wait(self, _timeout: float) -> bool:
            return len(checks) >= 3

    watchdog.run(StopAfterThree())
    assert len(checks) == 3  # it kept looking after two failed looks
