"""The worker channel's values and messages (nexus.workers.channel), in memory."""

from __future__ import annotations

from types import MappingProxyType

from twisted.internet.testing import StringTransport
from twisted.protocols import amp

from nexus.config import BackendConfig
from nexus.registry import HEALTHY, UNKNOWN, BackendRegistry
from nexus.tracking import RequestRecord
from nexus.workers.channel import (
    Records,
    apply_backend_state,
    backend_state,
    dumps,
    loads,
    pieces,
    record_fields,
    record_from,
    records_box,
)


def finished_record() -> RequestRecord:
    record = RequestRecord(
        started=1.0, request_id="abc", client="127.0.0.1", worker=2, model="m",
        actual_model="m", backend="a", backend_type="ollama", stream=True, attempts=2,
        route_reason="smart: a", error_type=None, prompt_tokens=3, completion_tokens=4,
        time_to_first_token=0.25, prompt_preview="never shipped",
    )
    record.finish(200, 3.5)
    return record


def test_a_record_crosses_whole_but_for_its_prompt_preview() -> None:
    record = finished_record()
    again = record_from(loads(dumps(record_fields(record))))
    assert again.prompt_preview is None
    record.prompt_preview = None
    assert again.__getstate__() == record.__getstate__()  # type: ignore[attr-defined]


def test_the_records_box_is_what_amp_itself_would_send() -> None:
    data = dumps([record_fields(finished_record())] * 3)
    sent = StringTransport()
    protocol = amp.AMP()
    protocol.makeConnection(sent)
    protocol.callRemote(Records, data=data)
    assert records_box(data) == sent.value()
    # ...and AMP on the other end reads it as the command.
    got: list[bytes] = []

    class Receiver(amp.AMP):
        @Records.responder
        def records(self, data: bytes) -> dict[str, object]:
            got.append(data)
            return {}

    receiver = Receiver()
    receiver.makeConnection(StringTransport())
    receiver.dataReceived(records_box(data) + records_box(b""))
    assert got == [data, b""]


def test_pieces_cover_the_value_in_amp_sized_slices() -> None:
    data = bytes(range(256)) * 1000
    parts = list(pieces(data, 60_000))
    assert b"".join(parts) == data and all(len(p) <= 60_000 for p in parts)
    assert list(pieces(b"")) == [b""]


def test_backend_states_make_a_workers_registry_the_supervisors() -> None:
    config = BackendConfig(
        name="a", url="http://127.0.0.1:1", models=("m",),
        model_capabilities=MappingProxyType({"m": frozenset({"vision"})}),
    )
    supervisor = BackendRegistry([config])
    worker = BackendRegistry([])
    seen: list[tuple[str, bool]] = []
    worker.observers.append(lambda b, removed: seen.append((b.status, removed)))
    backend = supervisor.get("a")
    apply_backend_state(worker, loads(dumps(backend_state(backend))))
    assert worker.get("a").status == UNKNOWN and worker.known_models == {"m"}
    backend.status = HEALTHY
    backend.models = frozenset({"m", "n"})
    backend.model_discoveries += 1
    mine = worker.get("a")
    mine.missing_endpoints.add("embeddings")
    apply_backend_state(worker, loads(dumps(backend_state(backend))))
    assert mine.status == HEALTHY and worker.is_available("n")
    assert mine.missing_endpoints == set()  # a new discovery: every endpoint again
    assert mine.config.model_capabilities["m"] == frozenset({"vision"})
    assert seen == [(UNKNOWN, False), (UNKNOWN, False), (HEALTHY, False)]


# -- the supervisor's sockets --------------------------------------------------------------


def test_each_worker_gets_its_own_socket_on_one_port() -> None:
    import socket

    from nexus.workers.supervisor import listening_sockets

    sockets = listening_sockets("tcp:0:interface=127.0.0.1:backlog=64", 3)
    try:
        ports = {s.getsockname() for s in sockets}
        assert len(sockets) == 3 and len(ports) == 1  # one address, three sockets
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in sockets)
        assert all(not s.getblocking() for s in sockets)
        # A client connects; one of them (the kernel's choice) has it to accept.
        with socket.create_connection(next(iter(ports)), timeout=5):
            import select

            ready, _, _ = select.select(sockets, [], [], 5)
            assert len(ready) == 1
    finally:
        for s in sockets:
            s.close()


def test_a_busy_port_is_one_error_and_leaves_nothing_open() -> None:
    import socket

    import pytest

    from nexus.workers.supervisor import listening_sockets

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            listening_sockets(f"tcp:{port}:interface=127.0.0.1", 2)


def test_workers_listen_on_tcp_only() -> None:
    from nexus.workers.supervisor import listen_problem

    assert listen_problem("tcp:8000:interface=127.0.0.1") is None
    assert listen_problem("tcp6:8000:interface=\\:\\:1") is None
    for description in ("unix:/run/nexus.sock", "ssl:8443:privateKey=k.pem"):
        problem = listen_problem(description)
        assert problem is not None and "workers = 1" in problem and description in problem


def test_a_second_gateway_cannot_join_the_first_ones_port() -> None:
    import pytest

    from nexus.workers.supervisor import listening_sockets

    first = listening_sockets("tcp:0:interface=127.0.0.1", 2)
    try:
        port = first[0].getsockname()[1]
        with pytest.raises(OSError):  # SO_REUSEPORT alone would have let it in
            listening_sockets(f"tcp:{port}:interface=127.0.0.1", 2)
    finally:
        for s in first:
            s.close()


def test_a_worker_leaves_the_fleet_to_its_supervisor() -> None:
    """One health poller and one mDNS browser per gateway: the supervisor's, none in workers."""
    from twisted.application.service import Service
    from twisted.internet.task import Clock

    from nexus.config import load_config
    from nexus.service import GatewayService, build_gateway

    config, _ = load_config(None, environ={"NEXUS_DISCOVERY": "true"})
    gateway = build_gateway(config, Clock())
    listener = Service()
    listener.setName("http")
    worker = GatewayService(gateway, Clock(), demo=True, listener=listener, fleet=False)
    assert sorted(s.name for s in worker if s.name) == ["dashboard", "http", "upstream"]
    supervisor = GatewayService(build_gateway(config, Clock()), Clock(), demo=True)
    names = {s.name for s in supervisor if s.name}
    assert {"health", "discovery", "demo-backend", "http"} <= names


def test_auto_is_one_worker_per_cpu_this_process_may_use() -> None:
    import os

    from nexus.workers.supervisor import worker_count

    assert worker_count("auto") == len(os.sched_getaffinity(0))
    assert worker_count(3) == 3


def test_a_read_in_a_worker_first_sends_the_records_its_site_still_holds() -> None:
    # A worker's finished records wait for its next idle moment (NexusSite.finished);
    # a sync (before any read of the numbers) sends them ahead of its question, so the
    # supervisor's answer and every other worker's numbers include them.
    from twisted.internet.task import Clock

    from nexus.config import load_config
    from nexus.service import build_gateway
    from nexus.workers.worker import WorkerLink

    config, _ = load_config(None, environ={"NEXUS_DISCOVERY": "false"})
    clock = Clock()
    gateway = build_gateway(config, clock)
    link = WorkerLink(gateway, clock, on_start=lambda started: None)
    gateway.site.recorders += (link.record,)
    transport = StringTransport()
    link.makeConnection(transport)
    gateway.site.finished(finished_record())
    assert transport.value() == b""  # waiting in the site
    link.sync()
    records, sync = amp.parseString(transport.value())
    assert records[b"_command"] == b"Records" and sync[b"_command"] == b"Sync"
    [fields] = loads(records[b"data"])
    assert record_from(fields).request_id == "abc"
