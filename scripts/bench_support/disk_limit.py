"""The disk's limit for durable acknowledgement: 1 KB appends to one file, with one fdatasync per
record and with one per GROUP records (group commit). Prints one JSON line.

Usage: python3 disk_limit.py DIR SECONDS [GROUP]
Each mode runs for SECONDS (at most 10,000,000 records); the file is removed afterwards.
"""
import json
import os
import sys
import time


def run(directory: str, seconds: float, group: int) -> float:
    path = os.path.join(directory, f"disk-limit-{group}.bin")
    record = (b"x" * 1023) + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
    try:
        written = 0
        started = time.monotonic()
        deadline = started + seconds
        while time.monotonic() < deadline and written < 10_000_000:
            for _ in range(group):
                os.write(fd, record)
            os.fdatasync(fd)
            written += group
        took = time.monotonic() - started
    finally:
        os.close(fd)
        os.unlink(path)
    return written / took


def main() -> None:
    directory, seconds = sys.argv[1], float(sys.argv[2])
    group = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    print(json.dumps({
        "per_record_rps": round(run(directory, seconds, 1), 1),
        "group": group,
        "group_rps": round(run(directory, seconds, group), 1),
    }))


if __name__ == "__main__":
    main()
