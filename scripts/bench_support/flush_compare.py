"""Flush helpers for scripts/bench-compare (runs in the bench venv: needs psycopg).

  files PG_URL AGENT_ID DIR ENTITY
      Writes the payloads that `estafeta flush` delivered for AGENT_ID (the same rows) as the
      baseline's staged files, DIR/create/ENTITY/yyyy/mm/dd/<unique>.json, one per record.
  copy PG_URL AGENT_ID
      Reads the same rows into memory, then times PostgreSQL COPY ... FROM STDIN driven from
      Python (psycopg's cursor.copy, write_row) into a scratch table like the landing table
      (same columns, same indexes), checks the count, drops it. Prints JSON.
  count DIR
      Prints how many *.json files are under DIR.
  delete-baseline PG_URL ENTITY
      Deletes the rows flush.py inserted for ENTITY (if baseline_records exists).
"""
import datetime
import json
import os
import sys
import time

COLS = ["idempotency_key", "agent_id", "seq", "action", "entity", "record_key", "payload", "staged_at"]


def connect(url):
    import psycopg

    return psycopg.connect(url.replace("postgres://", "postgresql://", 1))


def files(url, agent, directory, entity):
    now = datetime.datetime.now()
    folder = os.path.join(directory, "create", entity, f"{now:%Y}", f"{now:%m}", f"{now:%d}")
    os.makedirs(folder, exist_ok=True)
    stamp = int(f"{now:%Y%m%d%H%M%S%f}")
    n = 0
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT payload::text FROM estafeta_records WHERE agent_id = %s ORDER BY seq", (agent,))
        for (payload,) in cur:
            # One file per record, named by (distinct) microsecond as the seed's app does.
            with open(os.path.join(folder, f"{stamp + n}.json"), "w", encoding="utf-8") as f:
                f.write(payload)
            n += 1
    print(n)


def copy(url, agent):
    cols = ", ".join(COLS)
    scratch = f"estafeta_bench_pycopy_{os.getpid()}"
    with connect(url) as conn:
        with conn.cursor() as cur:
            # payload as its JSON text, as COPY's text format carries it.
            select = cols.replace("payload", "payload::text")
            cur.execute(f"SELECT {select} FROM estafeta_records WHERE agent_id = %s ORDER BY seq", (agent,))
            rows = cur.fetchall()
            cur.execute(f"DROP TABLE IF EXISTS {scratch}")
            cur.execute(f"CREATE TABLE {scratch} (LIKE estafeta_records INCLUDING ALL)")
        conn.commit()
        try:
            started = time.monotonic()
            with conn.cursor() as cur:
                with cur.copy(f"COPY {scratch} ({cols}) FROM STDIN") as cp:
                    for row in rows:
                        cp.write_row(row)
            conn.commit()
            took = time.monotonic() - started
            with conn.cursor() as cur:
                cur.execute(f"SELECT count(*) FROM {scratch}")
                count = cur.fetchone()[0]
        finally:
            conn.rollback()
            conn.execute(f"DROP TABLE IF EXISTS {scratch}")
            conn.commit()
    if count != len(rows):
        sys.exit(f"COPY from Python loaded {count} rows, expected {len(rows)}")
    print(json.dumps({"rows": count, "seconds": round(took, 3), "rows_per_sec": round(count / took, 1)}))


def count(directory):
    n = 0
    for _, _, names in os.walk(directory):
        n += sum(1 for name in names if name.endswith(".json"))
    print(n)


def delete_baseline(url, entity):
    with connect(url) as conn:
        exists = conn.execute("SELECT to_regclass('public.baseline_records') IS NOT NULL").fetchone()[0]
        if exists:
            conn.execute("DELETE FROM baseline_records WHERE entity = %s", (entity,))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"files": files, "copy": copy, "count": count, "delete-baseline": delete_baseline}[cmd](*args)
