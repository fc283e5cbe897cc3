"""The background lane (lazyfs/registry/lanes.py): the fill's own connections and windows, held
on the wire while a foreground request is open. Against the fault-injecting server, real TCP."""

from __future__ import annotations

import socket
from typing import Any, cast

import anyio
import pytest
from faulthelpers import add_blob, ref_on
from faultserver import FaultServer

from lazyfs.model.ranges import ByteRange
from lazyfs.model.traffic import background_traffic, is_background
from lazyfs.registry import lanes
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.lanes import BackgroundLane, DeliveryRate, window_bytes

pytestmark = pytest.mark.anyio

BLOB_BYTES = 4 << 20
REPO = "lanes/test"


def _lane(client: RegistryClient) -> BackgroundLane:
    return client._transport.lane


# ------------------------------------------------------------------------------ the window


def test_the_window_covers_the_path_plus_the_target_queue() -> None:
    rate = 2_500_000.0  # 20 Mbit/s
    assert window_bytes(rate, 0.150, 1) == int(rate * (0.150 + lanes.TARGET_QUEUE_S))
    assert window_bytes(rate, 0.150, 4) == int(rate * (0.150 + lanes.TARGET_QUEUE_S) / 4)
    # The path alone allows no queue: the window is the floor, shared.
    assert window_bytes(rate, 0.0, 1) == lanes.MIN_WINDOW_BYTES
    assert window_bytes(0.0, 0.0, 64) == lanes.MIN_CONNECTION_WINDOW_BYTES
    assert window_bytes(1e12, 1.0, 1) == lanes.MAX_CONNECTION_WINDOW_BYTES


def test_an_estimate_that_binds_the_window_can_grow() -> None:
    """Throughput under a window W over a path of least RTT r is at most W / r; the window
    leaves room above the rate it came from, so a low estimate climbs back to the link's."""
    link, rtt = 2_500_000.0, 0.150
    estimate = 200_000.0
    for _ in range(40):
        window = window_bytes(estimate, rtt, 1)
        estimate = min(link, window / rtt)
    assert estimate == link


def test_the_rate_is_the_best_complete_bin() -> None:
    rate = DeliveryRate()
    rate.add(100_000, 0.01)
    rate.add(100_000, 0.20)  # same bin: 200,000 in 0.25 s
    rate.add(50_000, 0.30)
    assert rate.bytes_per_s(0.30) == 800_000.0  # the current bin does not count yet
    assert rate.bytes_per_s(0.60) == 800_000.0
    assert rate.bytes_per_s(0.25 * (lanes.RATE_BINS + 2)) == 0.0  # too old


def test_traffic_class_is_scoped_and_inherited() -> None:
    assert not is_background()
    with background_traffic():
        assert is_background()
    assert not is_background()


# ------------------------------------------------------------------------------ on the wire


async def test_background_answers_wait_while_a_foreground_request_is_open(
    server: FaultServer, client: RegistryClient
) -> None:
    data, digest = add_blob(server, BLOB_BYTES)
    lane = _lane(client)
    got: list[bytes] = []

    async def fill() -> None:
        with background_traffic():
            got.append(
                await client.get_blob_range(ref_on(server, REPO), digest, ByteRange(0, len(data)))
            )

    async with anyio.create_task_group() as tasks, lane.foreground():
        tasks.start_soon(fill)
        await anyio.sleep(0.3)
        assert lane.stats.background_bytes == 0  # held: not sent, or not read
        assert lane.stats.pauses >= 1
        # Released: the background request goes on.
    assert got == [data]
    assert lane.stats.background_requests == 1
    assert lane.stats.background_bytes == len(data)


async def test_a_foreground_exchange_holds_the_lane_until_its_answer_is_closed(
    server: FaultServer, client: RegistryClient
) -> None:
    data, digest = add_blob(server, 100_000)
    server.faults.stall_after_bytes, server.faults.stall_times = 1000, 1
    server.faults.stall_s, server.faults.trickle_interval_s = 30.0, 0.0005
    lane = _lane(client)
    seen: list[int] = []

    async def watch() -> None:
        while not seen or seen[-1] == 0:
            seen.append(lane.foreground_open)
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(watch)
        body = await client.get_blob_range(ref_on(server, REPO), digest, ByteRange(0, 5000))
        assert lane.foreground_open == 0
    assert body == data[:5000]
    assert 1 in seen


async def test_background_requests_use_connections_of_their_own(
    server: FaultServer, client: RegistryClient
) -> None:
    data, digest = add_blob(server, 300_000)
    ref = ref_on(server, REPO)
    assert await client.get_blob_range(ref, digest, ByteRange(0, 10)) == data[:10]
    with background_traffic():
        assert await client.get_blob_range(ref, digest, ByteRange(10, 300_000)) == data[10:]
    pools = client._transport._http._transport._pools  # type: ignore[attr-defined]
    assert sorted(key[-1] for key in pools) == [False, True]
    lane = _lane(client)
    assert lane.stats.background_requests == 1
    if lanes._TCP_WINDOW_CLAMP is not None:
        assert lane.stats.window_bytes >= lanes.MIN_CONNECTION_WINDOW_BYTES
        assert lane.stats.window_bytes <= lanes.MAX_CONNECTION_WINDOW_BYTES
        # The receive buffer is bounded too (no autotuning to megabytes); the answer is
        # whole, so its connection's buffer is back to the least.
        # (Sockets of earlier tests may linger in the table, closed, until collected.)
        bounded = [(s, n) for s, n in lane.buffers.items() if cast(Any, s).fileno() != -1]
        assert bounded
        least = lanes.MIN_CONNECTION_WINDOW_BYTES * lanes.BUFFER_WINDOWS
        for sock, size in bounded:
            assert size == least
            # Linux doubles the value asked for (bookkeeping overhead).
            kernel = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4)
            assert least <= int.from_bytes(kernel, "little") <= 2 * least


async def test_an_answer_closed_early_leaves_the_count(
    server: FaultServer, client: RegistryClient
) -> None:
    """A reader that gives up on a background answer (an error, a cancelled fetch) must not
    leave it counted: the windows are split over the answers being read."""
    data, digest = add_blob(server, 1 << 20)
    server.faults.stall_after_bytes, server.faults.stall_times = 200_000, 1
    lane = _lane(client)
    seen: list[int] = []
    with anyio.move_on_after(1.0) as scope, background_traffic():
        async with anyio.create_task_group() as tasks:

            async def watch() -> None:
                while True:
                    seen.append(lane._answers)
                    await anyio.sleep(0.05)

            tasks.start_soon(watch)
            await client.get_blob_range(ref_on(server, REPO), digest, ByteRange(0, len(data)))
    assert scope.cancelled_caught  # the body stalled: the read was given up
    assert 1 in seen  # it was being read
    assert lane._answers == 0
