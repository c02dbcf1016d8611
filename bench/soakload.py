"""The soak's load: one process in the pod namespace, the app of the pod.

Standalone on purpose (stdlib and uvloop only, run by path), like loadgen.py:
it runs as root, so every connection it opens to a service address is
redirected to the proxy. It runs `clients` connection loops for `seconds`
(bounded in time and in count), each picking one kind of connection at a
time by weight:

    echo      send a few KiB to 256 KiB of a per-connection pattern to the
              app server's ECHO port, read it all back, check every byte
    slow      the same with 1 MiB, read back in 4 KiB reads with pauses:
              the relay must hold the client's writes back (backpressure)
    reset     send a part, then reset the connection (SO_LINGER 0)
    refused   a port where nobody listens: the proxy must end the client, with a
              reset once the client's bytes reached it (with a FIN before, as Envoy)

Every byte that comes back is compared with what was sent. A connection
cut by a fault (a worker killed, stopped) must end with a reset: one that
ends with a clean FIN before all bytes came back is counted as
`truncated_clean`, the failure issue 12 names ("a stream cut in the middle
looks complete"). Prints one JSON line with the counts each `report`
seconds and a last one at the end.

    python soakload.py '{"host": "198.51.100.10", "clients": 16, "seconds": 600}'
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import struct
import sys
import time
from collections import Counter

ECHO = 9003
REFUSED_PORT = 9  # nothing listens there in the remote namespace
LINGER_RST = struct.pack("ii", 1, 0)
KINDS = (("echo", 70), ("slow", 10), ("reset", 12), ("refused", 8))
TIMEOUT = 30.0  # seconds one connection may take before it counts as hung


def pattern(seed: int, size: int) -> bytes:
    """size bytes only this connection sends: a slice the wrong connection returned would not match."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest() * 64  # 2 KiB
    return (block * (size // len(block) + 1))[:size]


class Soak:
    def __init__(self, host: str, seed: int) -> None:
        self.host = host
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.next_seed = seed * 1_000_000

    def pick(self) -> str:
        return self.rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]

    async def one(self, kind: str) -> None:
        self.counts["connections"] += 1
        self.counts[f"kind_{kind}"] += 1
        self.next_seed += 1
        try:
            await asyncio.wait_for(getattr(self, kind)(self.next_seed), TIMEOUT)
        except TimeoutError:
            self.counts["hung"] += 1
        except asyncio.IncompleteReadError:  # a clean end before everything came back
            self.counts["truncated_clean"] += 1
        except ConnectionRefusedError:
            self.counts["refused_at_connect"] += 1
        except (ConnectionResetError, BrokenPipeError):
            self.counts["reset_by_peer"] += 1
        except OSError as exc:
            self.counts[f"error_{type(exc).__name__}"] += 1

    async def _exchange(self, seed: int, size: int, read_size: int, pause: float) -> None:
        reader, writer = await asyncio.open_connection(self.host, ECHO)
        try:
            data = pattern(seed, size)
            writer.write(data)
            got = 0
            while got < size:
                chunk = await reader.read(min(read_size, size - got))
                if not chunk:  # a clean end before everything came back
                    self.counts["truncated_clean"] += 1
                    return
                if chunk != data[got:got + len(chunk)]:
                    self.counts["corrupted"] += 1
                    return
                got += len(chunk)
                self.counts["bytes_checked"] += len(chunk)
                if pause:
                    await asyncio.sleep(pause)
            await writer.drain()
            self.counts["served"] += 1
        finally:
            writer.close()

    async def echo(self, seed: int) -> None:
        await self._exchange(seed, self.rng.randrange(4 << 10, 256 << 10), 64 << 10, 0.0)

    async def slow(self, seed: int) -> None:
        await self._exchange(seed, 1 << 20, 4 << 10, 0.002)

    async def reset(self, seed: int) -> None:
        reader, writer = await asyncio.open_connection(self.host, ECHO)
        data = pattern(seed, 64 << 10)
        writer.write(data)
        got = await reader.readexactly(4 << 10)
        if got != data[:len(got)]:
            self.counts["corrupted"] += 1
        self.counts["bytes_checked"] += len(got)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        writer.transport.abort()
        self.counts["reset_by_client"] += 1

    async def refused(self, seed: int) -> None:
        reader, writer = await asyncio.open_connection(self.host, REFUSED_PORT)
        try:
            writer.write(b"hello")
            data = await reader.read(1)  # the proxy ends it: never an answer
            self.counts["refused_clean_end" if data == b"" else "refused_answered"] += 1
        except (ConnectionResetError, BrokenPipeError):
            self.counts["refused_reset"] += 1
        finally:
            writer.close()


async def main(spec: dict) -> None:
    soak = Soak(spec["host"], spec.get("seed", 1))
    deadline = time.monotonic() + spec["seconds"]
    max_ops = spec.get("max_ops", 10_000_000)

    async def client() -> None:
        while time.monotonic() < deadline and soak.counts["connections"] < max_ops:
            await soak.one(soak.pick())

    async def reporter() -> None:
        while True:
            await asyncio.sleep(spec.get("report", 10))
            print(json.dumps({"progress": dict(soak.counts)}), flush=True)

    report = asyncio.ensure_future(reporter())
    await asyncio.gather(*(client() for _ in range(spec["clients"])))
    report.cancel()
    print(json.dumps({"done": dict(soak.counts)}), flush=True)


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(json.loads(sys.argv[1])))
