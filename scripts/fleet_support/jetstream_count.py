#!/usr/bin/env python3
"""Prints the number of messages a JetStream stream holds (or "missing"), asking the server
with the plain NATS protocol ($JS.API.STREAM.INFO), so no client library is needed.

Usage: jetstream_count.py HOST:PORT STREAM [delete]   ("delete" removes the stream instead)
       jetstream_count.py HOST:PORT STREAM create SUBJECTS REPLICAS DUPLICATE_WINDOW_SECS
("create" makes a file-stored stream capturing SUBJECTS with REPLICAS replicas, retrying for up
to 60 s while a fresh cluster elects its meta leader; it prints the leader of the new stream.)
"""
import json
import socket
import sys
import time


def request(host, port, subject, body=b""):
    s = socket.create_connection((host, port), timeout=5)
    f = s.makefile("rb")
    f.readline()  # INFO
    s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB _INBOX.count 1\r\n')
    s.sendall(f"PUB {subject} _INBOX.count {len(body)}\r\n".encode() + body + b"\r\nPING\r\n")
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


def create(host, port, stream, subjects, replicas, window_secs):
    config = {
        "name": stream,
        "subjects": [subjects],
        "retention": "limits",
        "storage": "file",
        "num_replicas": replicas,
        "duplicate_window": int(window_secs * 1e9),
    }
    deadline = time.time() + 60
    while True:
        try:
            info = request(host, port, f"$JS.API.STREAM.CREATE.{stream}", json.dumps(config).encode())
        except (OSError, SystemExit) as err:
            info = {"error": {"description": str(err)}}
        if "error" not in info:
            print(info.get("cluster", {}).get("leader", "?"))
            return
        # A fresh cluster answers "JetStream system temporarily unavailable" (or nothing) until
        # it has a meta leader.
        if time.time() > deadline:
            raise SystemExit(f"creating the stream {stream}: {info['error'].get('description')}")
        time.sleep(0.5)


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    stream = sys.argv[2]
    if len(sys.argv) > 3 and sys.argv[3] == "create":
        create(host, int(port), stream, sys.argv[4], int(sys.argv[5]), float(sys.argv[6]))
        return
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
