#!/usr/bin/env python3
"""JetStream stream chores for scripts/bench-drain, over the plain NATS protocol (no client
library to install): create a stream for some subjects, print its message count, delete it.

Usage: jetstream.py URL create STREAM SUBJECT_PATTERN
       jetstream.py URL count STREAM        (prints the number of messages)
       jetstream.py URL delete STREAM       (no error when it does not exist)
URL: nats://127.0.0.1:4222. Exits 1 with the server's error, which says what to fix.
"""

import json
import socket
import sys
import urllib.parse

TIMEOUT_SECS = 10


class Nats:
    def __init__(self, url):
        u = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 4222), TIMEOUT_SECS)
        self.buf = b""
        self._line()  # INFO {...}
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":false}\r\nSUB _bench_inbox 1\r\n')

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the NATS server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the NATS server closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def request(self, subject, body):
        payload = json.dumps(body).encode() if body is not None else b""
        self.sock.sendall(b"PUB %s _bench_inbox %d\r\n%s\r\n" % (subject.encode(), len(payload), payload))
        while True:
            line = self._line()
            if line.startswith(b"PING"):
                self.sock.sendall(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise RuntimeError(line.decode())
            elif line.startswith(b"MSG "):
                size = int(line.split()[-1])
                return json.loads(self._exact(size) or b"{}")


def main(argv):
    if len(argv) < 4:
        sys.exit(__doc__)
    url, verb, stream = argv[1], argv[2], argv[3]
    nats = Nats(url)
    if verb == "create":
        answer = nats.request(f"$JS.API.STREAM.CREATE.{stream}", {
            "name": stream, "subjects": [argv[4]], "storage": "file", "retention": "limits",
            "num_replicas": 1, "discard": "old"})
    elif verb == "count":
        answer = nats.request(f"$JS.API.STREAM.INFO.{stream}", None)
        if "error" not in answer:
            print(answer["state"]["messages"])
    elif verb == "delete":
        answer = nats.request(f"$JS.API.STREAM.DELETE.{stream}", None)
        if answer.get("error", {}).get("code") == 404:
            answer = {}
    else:
        sys.exit(__doc__)
    if "error" in answer:
        sys.exit(f"jetstream.py: {verb} {stream}: {answer['error']} (is JetStream on at {url}? scripts/start-services starts it)")


if __name__ == "__main__":
    main(sys.argv)
