#!/usr/bin/env python3
"""A TCP proxy the fleet simulation uses to cut the central side and bring it back.

Usage: proxy.py LISTEN_PORT TARGET_HOST:PORT [LISTEN_PORT TARGET_HOST:PORT ...]
SIGUSR1 cuts: every open connection is closed and new ones are refused (the ports stop
listening). SIGUSR2 restores. SIGTERM exits. Prints "ready" once listening.
"""
import asyncio
import signal
import sys


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


class Proxy:
    def __init__(self, routes):
        self.routes = routes  # [(listen_port, host, port)]
        self.servers = []
        self.conns = set()

    async def handle(self, reader, writer, host, port):
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        tasks = {asyncio.ensure_future(pipe(reader, up_writer)), asyncio.ensure_future(pipe(up_reader, writer))}
        entry = (writer, up_writer, frozenset(tasks))
        self.conns.add(entry)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        writer.close()
        up_writer.close()
        self.conns.discard(entry)

    async def up(self):
        if self.servers:
            return
        for listen, host, port in self.routes:
            server = await asyncio.start_server(
                lambda r, w, h=host, p=port: self.handle(r, w, h, p), "127.0.0.1", listen, reuse_address=True
            )
            self.servers.append(server)

    async def down(self):
        for server in self.servers:
            server.close()
            await server.wait_closed()
        self.servers = []
        for writer, up_writer, tasks in list(self.conns):
            for t in tasks:
                t.cancel()
            writer.transport.abort()
            up_writer.transport.abort()
        self.conns.clear()


async def main():
    args = sys.argv[1:]
    routes = []
    for i in range(0, len(args), 2):
        host, port = args[i + 1].rsplit(":", 1)
        routes.append((int(args[i]), host, int(port)))
    proxy = Proxy(routes)
    await proxy.up()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, lambda: asyncio.ensure_future(proxy.down()))
    loop.add_signal_handler(signal.SIGUSR2, lambda: asyncio.ensure_future(proxy.up()))
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await proxy.down()


if __name__ == "__main__":
    asyncio.run(main())
