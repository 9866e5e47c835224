#!/usr/bin/env python3
"""Print Markdown tables of ours vs the original from compare.sh's JSON lines, as ratios.

    report.py RESULTS.jsonl                     per-scenario tables of one run
    report.py --combined RUN.jsonl [EARLIER.jsonl ...]
                                                one table, scenarios as columns, each cell
                                                "ours vs original (ratio; earlier runs' ratios)"
"""
import json
import os
import sys

# The two servers compared: compare.sh labels them sealdb / original; ab.sh sets new / old.
A = os.environ.get("REPORT_A", "sealdb")
B = os.environ.get("REPORT_B", "original")

# metric, label, higher is better
ROWS = [
    ("upsert_json_vps", "upsert JSON vectors/s", True),
    ("upsert_binary_vps", "upsert binary vectors/s", True),
    ("train_s", "explicit train s", False),
    ("single_p50_ms", "single query p50 ms", False),
    ("single_p99_ms", "single query p99 ms", False),
    ("single_qps", "sequential QPS", True),
    ("concurrent4_qps", "4-client QPS", True),
    ("batch100_qps", "batch-100 QPS", True),
    ("recall_at_10", "recall@10", True),
    ("peak_rss_mb", "peak RSS MB", False),
]


def fmt(v):
    if v is None:
        return "-"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:,.0f}"


def main(path):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    by = {}
    for r in rows:
        by.setdefault(r["scenario"], {})[r["server"]] = r
    for scen, servers in by.items():
        ours, orig = servers.get(A), servers.get(B)
        print(f"\n### {scen}\n")
        print(f"| metric | {A} | {B} | ratio (better = >1) |")
        print("|---|---|---|---|")
        for key, label, higher in ROWS:
            a = ours.get(key) if ours else None
            b = orig.get(key) if orig else None
            ratio = "-"
            if a and b:
                ratio = f"{(a / b if higher else b / a):.2f}x"
            print(f"| {label} | {fmt(a)} | {fmt(b)} | {ratio} |")
        if ours and orig and ours.get("probe_sweep") and orig.get("probe_sweep"):
            print("\nn_probes sweep (recall@10 / p50 ms):\n")
            print(f"| n_probes | {A} | {B} |")
            print("|---|---|---|")
            for a, b in zip(ours["probe_sweep"], orig["probe_sweep"]):
                print(f"| {a['n_probes']} | {a['recall_at_10']:.3f} / {a['p50_ms']:.2f} | "
                      f"{b['recall_at_10']:.3f} / {b['p50_ms']:.2f} |")
            for target in (0.9, 0.95, 0.99):
                fa = next((s for s in ours["probe_sweep"] if s["recall_at_10"] >= target), None)
                fb = next((s for s in orig["probe_sweep"] if s["recall_at_10"] >= target), None)
                if fa and fb:
                    print(f"\nat recall >= {target}: {A} {fa['p50_ms']:.2f} ms (n_probes {fa['n_probes']}), "
                          f"{B} {fb['p50_ms']:.2f} ms (n_probes {fb['n_probes']}): "
                          f"{fb['p50_ms'] / fa['p50_ms']:.1f}x")


def load(path):
    by = {}
    for line in open(path):
        if line.strip():
            r = json.loads(line)
            by.setdefault(r["scenario"], {})[r["server"]] = r
    return by


def ratio(run, scen, key, higher):
    s = run.get(scen, {})
    a, b = s.get(A, {}).get(key), s.get(B, {}).get(key)
    if not a or not b:
        return None
    return a / b if higher else b / a


def combined(paths):
    runs = [load(p) for p in paths]
    main_run = runs[0]
    scens = list(main_run)
    print("| metric | " + " | ".join(scens) + " |")
    print("|---|" + "---|" * len(scens))
    for key, label, higher in ROWS:
        cells = []
        for scen in scens:
            s = main_run[scen]
            a, b = s.get(A, {}).get(key), s.get(B, {}).get(key)
            if key == "recall_at_10":
                cells.append(f"{fmt(a)} vs {fmt(b)}")
                continue
            r = ratio(main_run, scen, key, higher)
            cell = f"{fmt(a)} vs {fmt(b)} (**{r:.1f}x**" if r else f"{fmt(a)} vs {fmt(b)} (-"
            earlier = [ratio(run, scen, key, higher) for run in runs[1:]]
            if earlier:
                cell += "; before: " + ", ".join(f"{e:.1f}x" if e else "-" for e in earlier)
            cells.append(cell + ")")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if sys.argv[1] == "--combined":
        combined(sys.argv[2:])
    else:
        main(sys.argv[1])
