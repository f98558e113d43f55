#!/usr/bin/env python3
"""Samples the central side of a fleet simulation every INTERVAL seconds until SIGTERM, then
writes a JSON summary to OUT.

Usage: central_sampler.py OUT RUN INTERVAL [PGBOUNCER_PORT PGBOUNCER_PID] [--cpu LABEL PID]...
                          [--cpu-all LABEL PID]... [--fresh-backends]

- Server connections: the PostgreSQL backends whose application_name is RUN (the agents set it
  in their URL; through PgBouncer a server connection carries the application_name of the last
  client it served, so between agents and PostgreSQL only the run's pool has it), and all
  backends of database `test` (other users of the machine's PostgreSQL included). Peak of each.
- PgBouncer (when given): SHOW POOLS (1.18's columns) for database test: server connections
  (every sv_* state), clients waiting for one (cl_waiting), and the longest wait (maxwait).
  Peak of each.
- CPU at the central side, from /proc/<pid>/stat (utime + stime, in clock ticks): for each
  backend of the run, the CPU it used between the first and the last time it was seen (a backend
  that ends between two samples loses at most one interval of CPU), and PgBouncer's process;
  one last reading after SIGTERM. The
  WAL writer, checkpointer and autovacuum are not counted (they serve every user of the server).
- CPU of other central processes (`--cpu LABEL PID`, repeatable: relays, nats-servers), summed
  per label the same way, as `cpu_s` {LABEL: seconds}. `--cpu-all LABEL PID`: a process started
  for what is measured, counted from its start (not from the sampler's first look, which may
  come after it did much of its work). `--fresh-backends`: the same for the run's backends
  (every one of them was opened for what is measured).
- Landed: count of the run's rows in estafeta_records at every sample, with its time.
"""
import json
import os
import signal
import subprocess
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")


def psql(port, database, sql):
    out = subprocess.run(
        ["psql", "-X", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", database, "-AtqF", "|", "-c", sql],
        capture_output=True,
        text=True,
        timeout=10,
        env={**os.environ, "PGCONNECT_TIMEOUT": "3"},
    )
    if out.returncode != 0:
        return None
    return [line.split("|") for line in out.stdout.splitlines() if line]


def cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # Fields 14 and 15 (utime, stime) of proc(5), counted after the command's ")".
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


def main():
    args = sys.argv[1:]
    others = []  # (label, pid)
    from_start = set()  # pids counted from their start
    for flag in ("--cpu", "--cpu-all"):
        while flag in args:
            i = args.index(flag)
            others.append((args[i + 1], int(args[i + 2])))
            if flag == "--cpu-all":
                from_start.add(int(args[i + 2]))
            del args[i : i + 3]
    fresh_backends = "--fresh-backends" in args
    args = [a for a in args if a != "--fresh-backends"]
    out_path, run, interval = args[0], args[1], float(args[2])
    bouncer_port = int(args[3]) if len(args) > 3 else None
    bouncer_pid = int(args[4]) if len(args) > 4 else None
    other_first = {pid: 0 if pid in from_start else cpu_ticks(pid) for _, pid in others}
    other_last = dict(other_first)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    first, last = {}, {}  # backend pid -> ticks
    bouncer_first = cpu_ticks(bouncer_pid) if bouncer_pid else None
    bouncer_last = bouncer_first
    peak = {"run_backends": 0, "test_backends": 0, "bouncer_servers": 0, "bouncer_waiting": 0, "bouncer_maxwait_s": 0}
    landed = []
    t0 = time.time()
    while not stop:
        rows = psql(
            5432,
            "test",
            "select pid, application_name = '%s' from pg_stat_activity where datname = 'test' and backend_type = 'client backend'"
            % run.replace("'", "''"),
        )
        if rows is not None:
            ours = [int(pid) for pid, mine in rows if mine == "t"]
            peak["run_backends"] = max(peak["run_backends"], len(ours))
            peak["test_backends"] = max(peak["test_backends"], len(rows))
            for pid in ours:
                ticks = cpu_ticks(pid)
                if ticks is not None:
                    first.setdefault(pid, 0 if fresh_backends else ticks)
                    last[pid] = ticks
        if bouncer_port:
            pools = psql(bouncer_port, "pgbouncer", "show pools")
            for row in pools or []:
                # 1.18: database|user|cl_active|cl_waiting|cl_active_cancel_req|cl_waiting_cancel_req|
                # sv_active|sv_active_cancel|sv_being_canceled|sv_idle|sv_used|sv_tested|sv_login|
                # maxwait|maxwait_us|pool_mode
                if row[0] == "test":
                    servers = sum(int(x) for x in row[6:13])
                    peak["bouncer_servers"] = max(peak["bouncer_servers"], servers)
                    peak["bouncer_waiting"] = max(peak["bouncer_waiting"], int(row[3]))
                    peak["bouncer_maxwait_s"] = max(peak["bouncer_maxwait_s"], int(row[13]))
            ticks = cpu_ticks(bouncer_pid)
            if ticks is not None:
                bouncer_last = ticks
        for _, pid in others:
            ticks = cpu_ticks(pid)
            if ticks is not None:
                other_last[pid] = ticks
        count = psql(5432, "test", "select count(*) from estafeta_records where agent_id like '%s-%%'" % run)
        if count:
            landed.append([round(time.time(), 3), int(count[0][0])])
        time.sleep(max(0.0, interval - (time.time() - t0) % interval))
    # One last reading after SIGTERM, so a short run still counts the CPU of what is alive.
    for pid in last:
        ticks = cpu_ticks(pid)
        if ticks is not None:
            last[pid] = ticks
    for _, pid in others:
        ticks = cpu_ticks(pid)
        if ticks is not None:
            other_last[pid] = ticks
    if bouncer_pid:
        ticks = cpu_ticks(bouncer_pid)
        if ticks is not None:
            bouncer_last = ticks
    backend_secs = sum(last[pid] - first[pid] for pid in last) / TICKS
    bouncer_secs = (bouncer_last - bouncer_first) / TICKS if bouncer_first is not None else 0.0
    cpu_s = {}
    for label, pid in others:
        if other_first[pid] is not None:
            cpu_s[label] = round(cpu_s.get(label, 0.0) + (other_last[pid] - other_first[pid]) / TICKS, 2)
    with open(out_path, "w") as f:
        json.dump(
            {
                "peak": peak,
                "backends_seen": len(last),
                "cpu_backends_s": round(backend_secs, 2),
                "cpu_pgbouncer_s": round(bouncer_secs, 2),
                "cpu_s": cpu_s,
                "landed": landed,
            },
            f,
        )


if __name__ == "__main__":
    main()
