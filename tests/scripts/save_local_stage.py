#!/usr/bin/env python3
"""Writes records the way the RHP backend's save_local_stage() did (seed 002): one JSON file per
record at <root>/<action>/<entity>/<yyyy>/<mm>/<dd>/<timestamp>.json, the timestamp being the
local time as %Y%m%d%H%M%S%f, the payload dumped as it is (no envelope).

Usage: save_local_stage.py ROOT FILES KEYS
Writes FILES records of entity "paciente", action "update", spread over KEYS keys; record n
has {"id": "k<n % KEYS>", "n": n, "nome": "Conceição <n>"}, so per key the values of "n" grow
in the order the files were written.
"""
import json
import os
import sys
import time
from datetime import datetime


def save_local_stage(root, key_partition, action, data):
    now = datetime.now()
    folder = os.path.join(root, action, key_partition, now.strftime("%Y"), now.strftime("%m"), now.strftime("%d"))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, now.strftime("%Y%m%d%H%M%S%f") + ".json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    return path


def main():
    root, files, keys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    last = None
    for n in range(files):
        path = save_local_stage(root, "paciente", "update", {"id": f"k{n % keys}", "n": n, "nome": f"Conceição {n}"})
        if path == last:
            sys.exit(f"two records in the same microsecond: {path}")
        last = path
        # Spread the writes a little, as a backend would, so the agent adopts while they come.
        if n % 50 == 49:
            time.sleep(0.02)


if __name__ == "__main__":
    main()
