#!/usr/bin/env python3
"""Prints the number of messages a JetStream stream holds (or "missing"), asking the server
with the plain NATS protocol ($JS.API.STREAM.INFO), so no client library is needed.

Usage: jetstream_count.py HOST:PORT STREAM [delete]   ("delete" removes the stream instead)
"""
import json
import socket
import sys


def request(host, port, subject):
    s = socket.create_connection((host, port), timeout=5)
    f = s.makefile("rb")
    f.readline()  # INFO
    s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB _INBOX.count 1\r\n')
    s.sendall(f"PUB {subject} _INBOX.count 0\r\n\r\nPING\r\n".encode())
    while True:
        line = f.readline()
        if not line:
            raise SystemExit("the NATS server closed the connection")
        if line.startswith(b"MSG"):
            size = int(line.split()[-1])
            body = f.read(size + 2)[:size]
            s.close()
            return json.loads(body)
        if line.startswith(b"-ERR"):
            raise SystemExit(line.decode().strip())


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    stream = sys.argv[2]
    if len(sys.argv) > 3 and sys.argv[3] == "delete":
        request(host, int(port), f"$JS.API.STREAM.DELETE.{stream}")
        return
    info = request(host, int(port), f"$JS.API.STREAM.INFO.{stream}")
    if "error" in info:
        print("missing")
    else:
        print(info["state"]["messages"])


if __name__ == "__main__":
    main()
