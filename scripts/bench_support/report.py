"""Builds BENCHMARKS.md and the ingest plot for scripts/bench-compare (runs in the bench venv).

Usage: report.py RESULTS.jsonl BENCH_TABLE.md OUTPUT.md PLOT.png PLOT_LINK
RESULTS.jsonl holds one JSON object per measurement (kind: meta, disk, ingest, flush, binary);
BENCH_TABLE.md is the table printed by scripts/bench (Estafeta's ingest, idle and backlog
figures are read from it). PLOT_LINK is how OUTPUT.md refers to the plot.
"""
import json
import re
import sys


def num(text):
    m = re.search(r"-?[\d,]+(?:\.\d+)?", text)
    return float(m.group(0).replace(",", "")) if m else None


def fmt(x, digits=0):
    if x is None:
        return "–"
    return f"{x:,.{digits}f}"


def parse_bench(path):
    rows = []
    for line in open(path, encoding="utf-8"):
        if not line.startswith("| ") or line.startswith("| Measure"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 9:
            rows.append(cells)
    out = {"ingest": []}
    for m, setting, result, p50, p99, mx, errors, cpu, _goal in rows[:] if rows else []:
        if m.startswith("Ingest"):
            out["ingest"].append({
                "system": "estafeta", "connections": int(num(setting)),
                "batch": 256 if "256" in m else 1, "records_per_sec": num(result),
                "p50_ms": num(p50), "p99_ms": num(p99), "max_ms": num(mx),
                "errors": int(num(errors) or 0), "cpu": cpu,
            })
        elif m == "Idle RSS":
            out["idle_rss_mb"] = num(result)
        elif m == "Idle CPU":
            out["idle_cpu"] = result
        elif m == "RSS after load":
            out["load_rss_mb"] = num(result.split("MB")[0])
        elif m == "Start-up with a backlog":
            out["startup_ms"], out["backlog"] = num(result), setting.split(" records")[0]
        elif m == "RSS with a backlog":
            out["backlog_rss_mb"] = num(result)
        elif m.startswith("Flush to PostgreSQL"):
            out["bench_flush_pg"] = num(result)
        elif m.startswith("PostgreSQL COPY"):
            out["bench_psql_copy"] = num(result)
        elif m.startswith("Flush to MariaDB") and setting != "skipped":
            out["bench_flush_my"] = num(result)
    return out


def verdict(ok):
    return "met" if ok else "**missed**"


def main():
    results_path, bench_path, out_path, plot_path, plot_link = sys.argv[1:6]
    res = [json.loads(line) for line in open(results_path, encoding="utf-8") if line.strip()]
    meta = next(r for r in res if r["kind"] == "meta")
    disk = next(r for r in res if r["kind"] == "disk")
    binary = next(r for r in res if r["kind"] == "binary")
    flush = {r["system"]: r for r in res if r["kind"] == "flush"}
    bench = parse_bench(bench_path)
    ingest = bench["ingest"] + [r for r in res if r["kind"] == "ingest"]

    def series(system, batch=1):
        return sorted((r for r in ingest if r["system"] == system and r["batch"] == batch),
                      key=lambda r: r["connections"])

    est1, est256 = series("estafeta"), series("estafeta", 256)
    b1, b2 = series("baseline-1w"), series("baseline-2w")
    best = lambda rows: max((r["records_per_sec"] for r in rows), default=None)
    b2_best, b1_best = best(b2), best(b1)

    goals = []  # (goal, measured, ratio, ok)

    def ratio(a, b):
        return a / b if a is not None and b else None

    r = ratio(best(est1), b2_best)
    goals.append(("Durable ingest ≥ 8× the baseline's two-worker, no-fsync throughput (single 1 KB POSTs, best of 1/16/64 connections each)",
                  f"{fmt(best(est1))} vs {fmt(b2_best)} records/s", r, r is not None and r >= 8))
    b_any = max(x for x in (b1_best, b2_best, 0) if x is not None)
    r = ratio(best(est1), b_any)
    goals.append(("… the same against the baseline's best configuration (1 or 2 workers, any connection count)",
                  f"{fmt(best(est1))} vs {fmt(b_any)} records/s", r, r is not None and r >= 8))
    r = ratio(best(est256), b2_best)
    goals.append(("… the same with Estafeta's 256-record batches (the baseline takes one record per request)",
                  f"{fmt(best(est256))} vs {fmt(b2_best)} records/s", r, r is not None and r >= 8))
    r = ratio(best(est256), disk["group_rps"])
    goals.append((f"Batches ≥ 50% of the disk's group-commit ceiling (1 KB appends, one fdatasync per {disk['group']})",
                  f"{fmt(best(est256))} vs {fmt(disk['group_rps'])} records/s", r, r is not None and r >= 0.5))
    fl = flush.get("estafeta", {}).get("rows_per_sec")
    r = ratio(fl, flush.get("pycopy", {}).get("rows_per_sec"))
    goals.append(("Flush to PostgreSQL ≥ 1.0× PostgreSQL COPY driven from Python (psycopg) on the same rows",
                  f"{fmt(fl)} vs {fmt(flush.get('pycopy', {}).get('rows_per_sec'))} rows/s", r, r is not None and r >= 1.0))
    r = ratio(fl, flush.get("flushpy", {}).get("rows_per_sec"))
    goals.append(("Flush to PostgreSQL ≥ 10× the baseline's flush.py",
                  f"{fmt(fl)} vs {fmt(flush.get('flushpy', {}).get('rows_per_sec'))} rows/s", r, r is not None and r >= 10))
    v = bench.get("idle_rss_mb")
    goals.append(("Idle RSS ≤ 15 MB", f"{fmt(v, 1)} MB", None, v is not None and v <= 15))
    v = bench.get("backlog_rss_mb")
    goals.append((f"RSS with {bench.get('backlog', '?')} records pending ≤ 50 MB", f"{fmt(v, 1)} MB", None, v is not None and v <= 50))
    v = bench.get("startup_ms")
    goals.append((f"Start-up with {bench.get('backlog', '?')} records pending ≤ 1 s", f"{fmt(v)} ms", None, v is not None and v <= 1000))

    L = []
    quick = meta["quick"]
    L.append("# Benchmarks" + (" (quick run: short, small counts — figures not comparable)" if quick else ""))
    L.append("")
    L.append("Estafeta beside the old approach it replaces (`../shared/baseline/`: the seed's FastAPI app that")
    L.append("saves one JSON file per record, and its cron `flush.py`) and beside the disk's own limit, measured")
    L.append("in one run on one machine. Absolute figures drift on shared machines; the ratios, measured side")
    L.append("by side, are the point. Reproduce with `scripts/bench-compare` (see its `--help`).")
    L.append("")
    L.append(f"- Date: {meta['date']}")
    L.append(f"- Command: `{meta['command']}`")
    L.append(f"- Machine: {meta['cpu']}, nproc {meta['nproc']}, kernel {meta['kernel']}, {meta['mem']}; staging disk: {meta['disk']}")
    L.append(f"- Binaries: `estafeta` {meta.get('binary', '?')} (copied at the start of the run)")
    L.append(f"- Commit: {meta['commit']}; PostgreSQL {meta['pg_version']}; Python {meta['python']}")
    L.append(f"- Load on the machine: load average {meta['load_before']} before, {meta['load_after']} after; "
             f"peak 1-minute load average during the run {meta.get('load_peak', '?')}; "
             f"other processes compiling (cargo/rustc/cc1/ld) seen: {meta['builds_before']} before, "
             f"{meta['builds_after']} after, up to {meta.get('builds_peak', '?')} at once during the run.")
    if meta["builds_before"] or meta["builds_after"] or meta.get("builds_peak") or meta.get("load_peak", 0) > 1.0:
        L.append("  **Other engineers' builds were running on this 2-core machine during the run**, so absolute")
        L.append("  figures are lower and noisier than on an idle machine. The sections run one after another (Estafeta's")
        L.append("  ingest first, then the baseline's), so the load they shared the machine with differs between them too.")
    L.append("")
    L.append("## Goals (issue 6)")
    L.append("")
    L.append("| Goal | Measured | Ratio | Verdict |")
    L.append("|---|---|--:|---|")
    for g, m, r, ok in goals:
        L.append(f"| {g} | {m} | {'–' if r is None else f'{r:.2f}×'} | {verdict(ok)} |")
    L.append("")
    L.append("## Ingest")
    L.append("")
    L.append(f"1 KB records, `estafeta-load` ({meta['ingest_secs']} s per row, keep-alive, same machine). Estafeta acknowledges")
    L.append("(202) only after the record is durable (fdatasync, group commit); the baseline answers before anything")
    L.append("reaches the disk (no fsync), `SIMULATE_DB_DOWN=1` so every record takes its file path. Its RSS is the sum")
    L.append("over the uvicorn processes after the row; *lost* = acknowledged by HTTP but not on disk afterwards (two")
    L.append("records in the same microsecond share a file name, the second overwrites the first).")
    L.append("")
    L.append(f"![Ingest throughput and p99 against connections]({plot_link})")
    L.append("")
    L.append("| System | Connections | Records/request | Records/s | p50 ms | p99 ms | max ms | Errors | RSS | Acknowledged | Lost | Estafeta ÷ baseline (2 workers), same connections |")
    L.append("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    b2_by_c = {r["connections"]: r["records_per_sec"] for r in b2}
    names = {"estafeta": "Estafeta", "baseline-1w": "Baseline, 1 worker", "baseline-2w": "Baseline, 2 workers"}
    for r in est1 + est256 + b1 + b2:
        rss = f"{r['rss_kb'] / 1024:.1f} MB" if r.get("rss_kb") else ""
        cmp = ""
        if r["system"] == "estafeta" and r["batch"] == 1 and b2_by_c.get(r["connections"]):
            cmp = f"{r['records_per_sec'] / b2_by_c[r['connections']]:.1f}×"
        lost = r.get("lost")
        lost_s = "" if lost is None else (f"**{lost:,}** ({lost / r['records'] * 100:.2f} %)" if lost else "0")
        L.append(f"| {names[r['system']]} | {r['connections']} | {r['batch']} | {fmt(r['records_per_sec'])} | "
                 f"{r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | {r['errors']} | {rss} | "
                 f"{fmt(r.get('records')) if r.get('records') is not None else ''} | {lost_s} | {cmp} |")
    slow = [r for r in b2 if r["connections"] == 1 and r["p50_ms"] and r["p50_ms"] > 30]
    if slow and b1 and b1[0]["p50_ms"] and slow[0]["p50_ms"] > 10 * b1[0]["p50_ms"]:
        L.append("")
        L.append(f"Note: with 2 workers the baseline takes about {slow[0]['p50_ms']:.0f} ms per request at 1 connection where")
        L.append(f"1 worker takes {b1[0]['p50_ms']:.1f} ms. That ~40 ms floor looks like a Nagle/delayed-ACK stall in uvicorn's")
        L.append("multi-process mode (the baseline's requirements have no uvloop/httptools; h11 writes the head and the body")
        L.append("separately) — not profiled here. It inflates the ratios against two workers at low connection counts,")
        L.append("which is why the goals table also compares against the baseline's best configuration.")
    L.append("")
    L.append(f"Estafeta's RSS after all its ingest rows: {fmt(bench.get('load_rss_mb'), 1)} MB. Its records are checked")
    L.append("for loss by `scripts/bench` (no errors, and the flush delivers exactly what was staged).")
    L.append("")
    L.append("## The disk's limit")
    L.append("")
    L.append("| 1 KB appends to one file on the staging disk | Records/s | Estafeta's best ÷ this |")
    L.append("|---|--:|--:|")
    L.append(f"| one fdatasync per record | {fmt(disk['per_record_rps'])} | single POSTs: {fmt(ratio(best(est1), disk['per_record_rps']), 2)}× |")
    L.append(f"| one fdatasync per {disk['group']} records (group commit) | {fmt(disk['group_rps'])} | 256-batches: {fmt(ratio(best(est256), disk['group_rps']), 2)}× |")
    L.append("")
    L.append("## Flush to PostgreSQL")
    L.append("")
    n = flush.get("estafeta", {}).get("rows")
    L.append(f"A backlog of {fmt(n)} 1 KB records staged through Estafeta's API, then drained to the local PostgreSQL.")
    L.append("The same rows (read back from the landing table) are then written as the baseline's files for")
    L.append("`flush.py`, and loaded with COPY from Python into a scratch table with the landing table's columns and indexes.")
    L.append("")
    L.append("| Method | Rows | Seconds | Rows/s | Estafeta ÷ this |")
    L.append("|---|--:|--:|--:|--:|")
    labels = {"estafeta": "`estafeta flush` (into its landing table `estafeta_records`)",
              "pycopy": "PostgreSQL COPY from Python (psycopg `cursor.copy`)",
              "flushpy": "baseline `flush.py` (executemany, 500 per commit, deletes files)"}
    for k in ("estafeta", "pycopy", "flushpy"):
        if k in flush:
            f = flush[k]
            rel = "" if k == "estafeta" else f"{ratio(fl, f['rows_per_sec']):.2f}×"
            L.append(f"| {labels[k]} | {fmt(f['rows'])} | {f['seconds']:.2f} | {fmt(f['rows_per_sec'])} | {rel} |")
    if bench.get("bench_psql_copy"):
        L.append(f"| (scripts/bench) `estafeta flush` vs psql `\\copy` of its rows | | | {fmt(bench.get('bench_flush_pg'))} vs {fmt(bench['bench_psql_copy'])} | {ratio(bench.get('bench_flush_pg'), bench['bench_psql_copy']):.2f}× |")
    if bench.get("bench_flush_my"):
        L.append(f"| (scripts/bench) `estafeta flush` to MariaDB | | | {fmt(bench['bench_flush_my'])} | |")
    L.append("")
    L.append("## Footprint")
    L.append("")
    L.append("| Measure | Result |")
    L.append("|---|--:|")
    L.append(f"| Idle RSS | {fmt(bench.get('idle_rss_mb'), 1)} MB |")
    L.append(f"| Idle CPU | {bench.get('idle_cpu', '–')} |")
    L.append(f"| RSS with {bench.get('backlog', '?')} records pending | {fmt(bench.get('backlog_rss_mb'), 1)} MB |")
    L.append(f"| Start-up with {bench.get('backlog', '?')} records pending (to /healthz) | {fmt(bench.get('startup_ms'))} ms |")
    L.append(f"| Binary size (`estafeta`, release, stripped) | {binary['bytes'] / 1048576:.1f} MB ({binary['bytes']:,} bytes) |")
    base_rss = max((r.get("rss_kb", 0) for r in b2), default=0)
    if base_rss:
        L.append(f"| Baseline RSS, 2 workers, under load (sum of uvicorn processes) | {base_rss / 1024:.1f} MB |")
    L.append("")
    L.append("## Not measured here")
    L.append("")
    L.append("- Flush of 1,000,000 records and flush to a local HTTP server (the issue asks for them; this run does")
    L.append("  100,000 to PostgreSQL, and `scripts/bench` adds MariaDB).")
    L.append("- The profiles behind missed goals; the baseline at 256-record batches (its API takes one record per request).")
    L.append("")
    L.append("## scripts/bench's own table (same run)")
    L.append("")
    for line in open(bench_path, encoding="utf-8"):
        L.append(("#" + line.rstrip("\n")) if line.startswith("## ") else line.rstrip("\n"))
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("\n".join(L).rstrip() + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for rows, label, style in ((est1, "Estafeta (durable, single POSTs)", "o-"),
                               (b1, "Baseline, 1 worker (no fsync)", "s--"),
                               (b2, "Baseline, 2 workers (no fsync)", "^--")):
        if not rows:
            continue
        xs = [r["connections"] for r in rows]
        ax1.plot(xs, [r["records_per_sec"] for r in rows], style, label=label)
        ax2.plot(xs, [r["p99_ms"] for r in rows], style, label=label)
    ax1.axhline(disk["per_record_rps"], color="grey", linestyle=":", label="disk: one fdatasync per record")
    for ax, title, ylabel in ((ax1, "Ingest throughput (1 KB records)", "records/s"),
                              (ax2, "Time to acknowledge, p99", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 16, 64])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("connections")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    fig.suptitle(f"Estafeta vs baseline — {meta['cpu']}, nproc {meta['nproc']}, {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(plot_path, dpi=100)


if __name__ == "__main__":
    main()
