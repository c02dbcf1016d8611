"""The control channel between a supervisor and a worker, both ends on a real socketpair."""

from __future__ import annotations

import asyncio
import socket

import pytest

from proxy.control.channel import LINE_LIMIT, Channel, ChannelClosed, encode, read_first


async def pair(on_worker_message):
    """A supervisor's end and a worker's end, like supervisor.py and worker.py make them."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    heard: list[dict] = []
    closed: list[str] = []
    _, sup = await loop.create_unix_connection(lambda: Channel(heard.append, lambda: closed.append("sup")), sock=ours)
    worker: Channel | None = None

    def on_message(message):
        on_worker_message(worker, message)

    _, worker = await loop.create_unix_connection(lambda: Channel(on_message, lambda: closed.append("worker")),
                                                  sock=theirs)
    return sup, worker, heard, closed


def test_requests_commands_and_events_each_reach_the_right_place():
    async def scenario():
        commands = []

        def worker_side(channel, message):
            if "id" in message:
                channel.answer(message, {"echo": message["n"] * 2})
            else:
                commands.append(message)

        sup, worker, heard, closed = await pair(worker_side)
        assert await sup.request("double", 5, n=21) == {"echo": 42}
        answers = await asyncio.gather(*(sup.request("double", 5, n=i) for i in range(50)))
        assert [a["echo"] for a in answers] == [2 * i for i in range(50)]  # each answer to its own request
        sup.send({"op": "drain"})
        worker.send({"event": "ready"})
        await asyncio.sleep(0.05)
        assert commands == [{"op": "drain"}]
        assert heard == [{"event": "ready"}]
        sup.close()
        await asyncio.wait_for(worker.closed, 5)  # the other end is gone: the worker hears of it
        assert sorted(closed) == ["sup", "worker"]
    asyncio.run(scenario())


def test_a_request_to_a_gone_worker_fails_instead_of_hanging():
    async def scenario():
        sup, worker, _, _ = await pair(lambda channel, message: None)  # never answers
        pending = asyncio.ensure_future(sup.request("snapshot", 5, limit=1))
        await asyncio.sleep(0.05)
        worker.close()
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(pending, 5)
        with pytest.raises(ChannelClosed):
            await sup.request("snapshot", 5, limit=1)
    asyncio.run(scenario())


def test_garbage_on_the_channel_closes_it():
    async def scenario():
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        closed = loop.create_future()
        await loop.create_unix_connection(lambda: Channel(lambda m: None, lambda: closed.set_result(True)), sock=ours)
        theirs.sendall(b"this is not json\n")
        assert await asyncio.wait_for(closed, 5)
        theirs.close()
    asyncio.run(scenario())


def test_the_start_message_is_read_before_any_loop_runs_and_the_rest_is_kept():
    a, b = socket.socketpair()
    with a, b:
        b.sendall(encode({"op": "start", "index": 0}) + b'{"op":"dr')
        first, rest = read_first(a)
        assert first == {"op": "start", "index": 0} and rest == b'{"op":"dr'
        b.close()
        with pytest.raises(ValueError):
            read_first(a)
    assert LINE_LIMIT >= 1 << 20
