"""Flush helpers for scripts/bench-compare (runs in the bench venv: needs psycopg).

  files PG_URL AGENT_ID DIR ENTITY
      Writes the payloads that `estafeta flush` delivered for AGENT_ID (the same rows) as the
      baseline's staged files, DIR/create/ENTITY/yyyy/mm/dd/<unique>.json, one per record.
  copy PG_URL AGENT_ID [SHAPE...]
      Reads the same rows into memory once, then, for each SHAPE of scratch table, times
      PostgreSQL COPY ... FROM STDIN driven from Python (psycopg's cursor.copy, write_row) into
      it, checks the count and drops it. Prints one JSON line per shape. Shapes:
        landing   like the landing table: same columns, same indexes (the default; the goal's
                  comparison);
        noindex   the landing table's columns with only its primary key (no unique index on
                  the idempotency key, no secondary indexes): what the indexes cost;
        baseline  shaped like flush.py's baseline_records (bigserial primary key, action,
                  entity, payload jsonb; no other index): the same rows as flush.py writes them.
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
    # A server-side cursor: 1,000,000 payloads need not all sit in memory at once.
    with connect(url) as conn, conn.cursor(name="baseline_files") as cur:
        cur.itersize = 5000
        cur.execute("SELECT payload::text FROM estafeta_records WHERE agent_id = %s ORDER BY seq", (agent,))
        for (payload,) in cur:
            # One file per record, named by (distinct) microsecond as the seed's app does.
            with open(os.path.join(folder, f"{stamp + n}.json"), "w", encoding="utf-8") as f:
                f.write(payload)
            n += 1
    print(n)


# Scratch tables for `copy`: the DDL (with {t} for the name) and the columns COPY fills.
SHAPES = {
    "landing": ("CREATE TABLE {t} (LIKE estafeta_records INCLUDING ALL)", COLS),
    # INCLUDING DEFAULTS/IDENTITY keep the generated id and delivered_at's default; the primary
    # key is added back by hand, every other index (unique idempotency key, secondary) is left out.
    "noindex": ("CREATE TABLE {t} (LIKE estafeta_records INCLUDING DEFAULTS INCLUDING IDENTITY);"
                " ALTER TABLE {t} ADD PRIMARY KEY (id)", COLS),
    # flush.py's table, as it creates it.
    "baseline": ("CREATE TABLE {t} (id bigserial PRIMARY KEY, action text, entity text, payload jsonb)",
                 ["action", "entity", "payload"]),
}


def copy(url, agent, *shapes):
    shapes = shapes or ("landing",)
    with connect(url) as conn:
        with conn.cursor() as cur:
            # payload as its JSON text, as COPY's text format carries it. Read once, in memory,
            # so that only the COPY itself is timed (about 1.5 GB of Python objects for 1,000,000).
            select = ", ".join(COLS).replace("payload", "payload::text")
            cur.execute(f"SELECT {select} FROM estafeta_records WHERE agent_id = %s ORDER BY seq", (agent,))
            rows = cur.fetchall()
        conn.commit()
        for shape in shapes:
            ddl, cols = SHAPES[shape]
            pick = [COLS.index(c) for c in cols]
            scratch = f"estafeta_bench_pycopy_{shape}_{os.getpid()}"
            conn.execute(f"DROP TABLE IF EXISTS {scratch}")
            conn.execute(ddl.format(t=scratch))
            conn.commit()
            # The checkpoint of earlier writes (the SELECT's hint bits, the DDL) is not the COPY's;
            # bench-compare checkpoints before each timed flush too.
            conn.execute("CHECKPOINT")
            conn.commit()
            try:
                started = time.monotonic()
                with conn.cursor() as cur:
                    with cur.copy(f"COPY {scratch} ({', '.join(cols)}) FROM STDIN") as cp:
                        if len(pick) == len(COLS):
                            for row in rows:
                                cp.write_row(row)
                        else:
                            for row in rows:
                                cp.write_row([row[i] for i in pick])
                conn.commit()
                took = time.monotonic() - started
                count = conn.execute(f"SELECT count(*) FROM {scratch}").fetchone()[0]
            finally:
                conn.rollback()
                conn.execute(f"DROP TABLE IF EXISTS {scratch}")
                conn.commit()
            if count != len(rows):
                sys.exit(f"COPY from Python ({shape}) loaded {count} rows, expected {len(rows)}")
            print(json.dumps({"shape": shape, "rows": count, "seconds": round(took, 3),
                              "rows_per_sec": round(count / took, 1)}), flush=True)


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
