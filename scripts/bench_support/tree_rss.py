"""Prints the summed VmRSS (kB) of a process and all its descendants: python3 tree_rss.py PID"""
import os
import sys


def children(pid: int) -> list:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree(pid: int) -> list:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        try:
            todo += children(p)
        except OSError:
            pass
    return seen


if __name__ == "__main__":
    pids = tree(int(sys.argv[1]))
    if len(sys.argv) > 2 and sys.argv[2] == "--pids":
        print(" ".join(map(str, pids)))
    else:
        print(sum(rss_kb(p) for p in pids))
