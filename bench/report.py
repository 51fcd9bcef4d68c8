#!/usr/bin/env python3
"""Turns bench/run.sh's raw result lines into bench/results/run.json and run.md.

Usage: report.py RAW.jsonl OUT_DIR PROXY_CPUS LOAD_CPUS WORKERS CONNECTIONS DURATION
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGETS = ("direct", "nginx", "hyper", "fencegate")
METHODS = ("PUT", "GET")

def paired(s, setup, requests):
    """bench/paired.sh's medians for one setup and kind of request, if that run measured them."""
    return s.get("paired", {}).get(f"{setup} {requests}", {})


# The targets, as (label, check) over the summary below. Throughput is judged at the same
# moment (bench/paired.sh), which a drifting machine does not move; latency at half load in turn,
# the median of the rounds.
TARGET_CHECKS = [
    ("pinned: fenced-PUT throughput >= 1.0 x nginx proxy_pass, same moment",
     lambda s: paired(s, "pinned", "put").get("throughput_vs_nginx", 0) >= 1.0),
    ("pinned: unfenced-GET throughput >= 1.0 x nginx proxy_pass, same moment",
     lambda s: paired(s, "pinned", "get").get("throughput_vs_nginx", 0) >= 1.0),
    ("pinned: fenced-PUT p99 at 50% load <= nginx's",
     lambda s: s["ratios"]["PUT"]["p99_vs_nginx"] <= 1.0),
    ("pinned: unfenced-GET p99 at 50% load <= nginx's",
     lambda s: s["ratios"]["GET"]["p99_vs_nginx"] <= 1.0),
    ("shared: fenced-PUT throughput >= 1.0 x nginx proxy_pass, same moment",
     lambda s: paired(s, "shared", "put").get("throughput_vs_nginx", 0) >= 1.0),
    ("shared: unfenced-GET throughput >= 1.0 x nginx proxy_pass, same moment",
     lambda s: paired(s, "shared", "get").get("throughput_vs_nginx", 0) >= 1.0),
    ("shared: fenced-PUT p99 at 50% load <= nginx's",
     lambda s: "shared" in s and s["shared"]["ratios"]["PUT"]["p99_vs_nginx"] <= 1.0),
    ("shared: unfenced-GET p99 at 50% load <= nginx's",
     lambda s: "shared" in s and s["shared"]["ratios"]["GET"]["p99_vs_nginx"] <= 1.0),
    (">= 20,000 durable epoch advances/s", lambda s: s["advances"]["per_second"] >= 20_000),
    (">= 20,000 audited rejections/s", lambda s: s["rejections"]["per_second"] >= 20_000),
    ("RSS <= 200 MiB with 1,000,000 resources",
     lambda s: s["memory"]["resources"] >= 1_000_000 and s["memory"]["rss_mib"] <= 200),
    ("start-up <= 1 s with 1,000,000 resources", lambda s: s["startup"]["ready_s_max"] <= 1.0),
]


def per_second(wrk):
    return wrk["requests"] / (wrk["duration_us"] / 1e6)


def oha_latency_us(oha):
    """p50/p99/p99.9 of oha's latency-corrected distribution, in microseconds."""
    percentiles = oha["latencyPercentiles"]
    return {name: round(percentiles[key] * 1e6)
            for name, key in (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9"))}


def throughput_and_latency(by, prefix, targets):
    """The req/s, CPU per request and latency of each target, and fencegate's ratios to nginx."""
    throughput, latency = {}, {}
    for row in by[prefix + "throughput"]:
        requests = row["requests"]
        throughput.setdefault(row["method"], {})[row["target"]] = {
            "requests_per_s": round(per_second(row)),
            "cpu_us_per_request": round(float(row.get("cpu_seconds", "nan")) * 1e6 / max(1, requests), 1),
            "non_2xx": row["non_2xx"],
            "socket_errors": sum(row[k] for k in
                                 ("connect_errors", "read_errors", "write_errors", "timeouts")),
        }
    rounds = {}
    for row in by[prefix + "latency"]:
        rounds.setdefault((row["method"], row["target"]), []).append(row)
    for (method, target), rows in rounds.items():
        each = [oha_latency_us(row) for row in rows]
        latency.setdefault(method, {})[target] = {
            "rate": int(rows[0]["rate"]),
            "rounds": len(rows),
            "achieved_per_s": round(statistics.median(r["summary"]["requestsPerSec"] for r in rows)),
            "success_rate": min(r["summary"]["successRate"] for r in rows),
            # The median of each percentile over the rounds, and every round's p99.
            **{name: round(statistics.median(e[name] for e in each)) for name in each[0]},
            "p99_each": [e["p99"] for e in each],
        }
    ratios = {}
    for method in METHODS:
        t, l = throughput[method], latency[method]
        fg = t["fencegate"]["requests_per_s"]
        ratios[method] = {
            "throughput_vs_nginx": round(fg / t["nginx"]["requests_per_s"], 3),
            "throughput_vs_direct": round(fg / t["direct"]["requests_per_s"], 3),
            "cpu_per_request_vs_nginx": round(t["fencegate"]["cpu_us_per_request"]
                                              / t["nginx"]["cpu_us_per_request"], 3),
            "p50_vs_nginx": round(l["fencegate"]["p50"] / l["nginx"]["p50"], 3),
            "p99_vs_nginx": round(l["fencegate"]["p99"] / l["nginx"]["p99"], 3),
            "p999_vs_nginx": round(l["fencegate"]["p999"] / l["nginx"]["p999"], 3),
            "p99_vs_direct": round(l["fencegate"]["p99"] / l["direct"]["p99"], 3),
        }
        if "hyper" in t:
            ratios[method]["throughput_vs_hyper_floor"] = round(fg / t["hyper"]["requests_per_s"], 3)
            ratios[method]["hyper_floor_vs_nginx"] = round(
                t["hyper"]["requests_per_s"] / t["nginx"]["requests_per_s"], 3)
    return throughput, latency, ratios


def summarise(rows):
    by = {}
    for row in rows:
        by.setdefault(row["scenario"], []).append(row)
    throughput, latency, ratios = throughput_and_latency(by, "", TARGETS)
    shared = None
    if "shared_throughput" in by:
        s_t, s_l, s_r = throughput_and_latency(by, "shared_", ("direct", "nginx", "fencegate"))
        shared = {"throughput": s_t, "latency_at_half_saturation_us": s_l, "ratios": s_r}
    profile = {row["target"]: round(per_second(row)) for row in by.get("profile", [])}
    advances = by["advances"][0]
    rejections = by["rejections"][0]
    memory = by["memory"][0]
    startup = by["startup"][0]
    summary = {
        "throughput": throughput,
        "latency_at_half_saturation_us": latency,
        "ratios": ratios,
        "advances": {
            "per_second": round(int(advances["counted_advances"]) / (advances["duration_us"] / 1e6)),
            "requests": advances["requests"],
            "non_2xx": advances["non_2xx"],
            "p99_us": advances["p99_us"],
        },
        "rejections": {
            "per_second": round(int(rejections["counted_rejections"]) / (rejections["duration_us"] / 1e6)),
            "answered_409": rejections["non_2xx"],
            "audit_rows": int(rejections["audit_rows"]),
            "p99_us": rejections["p99_us"],
        },
        "memory": {
            "resources": int(memory["resources"]),
            "idle_rss_mib": round(int(memory["idle_rss_kib"]) / 1024, 1),
            "rss_mib": round(int(memory["rss_kib"]) / 1024, 1),
            "peak_rss_mib": round(int(memory["hwm_kib"]) / 1024, 1),
            "fill_seconds": float(memory["fill_seconds"]),
        },
        "profile": profile,
        "startup": {
            "ready_s_max": round(max(startup["ready_s"]), 3),
            "ready_s": [round(s, 3) for s in startup["ready_s"]],
            "first_409_s": [round(s, 3) for s in startup["first_409_s"]],
        },
    }
    if shared:
        summary["shared"] = shared
    if "paired" in by:
        summary["paired"] = {f"{row['setup']} {row['requests']}": row for row in by["paired"]}
    return summary


def latency_table(t, l, targets):
    lines = [
        "| | target | req/s (wrk) | CPU µs/request | p50 µs | p99 µs | p99.9 µs | oha rate |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        label = "fenced PUT (current token)" if method == "PUT" else "GET (unfenced)"
        for target in targets:
            name = {"nginx": "nginx proxy_pass", "direct": "upstream directly",
                    "hyper": "bare hyper proxy (floor)"}.get(target, target)
            lt, tt = l[method][target], t[method][target]
            lines.append(f"| {label} | {name} | {tt['requests_per_s']:,} | "
                         f"{tt['cpu_us_per_request']} | {lt['p50']:,} | {lt['p99']:,} | "
                         f"{lt['p999']:,} | {lt['rate']:,} |")
    return lines


def markdown(summary, setup):
    t, l, r = summary["throughput"], summary["latency_at_half_saturation_us"], summary["ratios"]
    lines = [
        "# fencegate benchmark",
        "",
        f"{setup['when']}, `{setup['host']}`, commit `{setup['commit']}`; reproduce with "
        f"`bench/run.sh` ({setup['build']}).",
        f"Proxies on CPU {setup['proxy_cpus']} ({setup['workers']} nginx worker(s), "
        f"{setup['workers']} fencegate worker thread(s)); wrk, oha and the upstream "
        f"(nginx `return 200`) on CPU {setup['load_cpus']}. {setup['connections']} connections, "
        f"{setup['duration_s']} s per measurement. Latency by oha, latency-corrected, with every "
        "proxy at the same rate (half the wrk saturation of the slower of nginx and fencegate; "
        "the upstream alone at half its own); the median of each percentile over "
        f"{setup['latency_rounds']} rounds, the targets in turn within each.",
        "",
    ]
    lines += latency_table(t, l, TARGETS)
    lines += ["", "| ratio | PUT | GET |", "|---|---:|---:|"]
    for key, label in (("throughput_vs_nginx", "throughput fencegate / nginx, in turn"),
                       ("cpu_per_request_vs_nginx", "CPU per request fencegate / nginx, in turn"),
                       ("throughput_vs_direct", "throughput fencegate / direct"),
                       ("p50_vs_nginx", "p50 fencegate / nginx"),
                       ("p99_vs_nginx", "p99 fencegate / nginx"),
                       ("p999_vs_nginx", "p99.9 fencegate / nginx"),
                       ("p99_vs_direct", "p99 fencegate / direct"),
                       ("throughput_vs_hyper_floor", "throughput fencegate / bare hyper proxy"),
                       ("hyper_floor_vs_nginx", "throughput bare hyper proxy / nginx")):
        lines.append(f"| {label} | {r['PUT'][key]:.2f} | {r['GET'][key]:.2f} |")
    if "shared" in summary:
        sh = summary["shared"]
        lines += ["", "Shared setup (the outside check's): two nginx workers and two fencegate "
                  "threads, wrk, oha and the upstream all on CPUs 0,1, nothing pinned apart.", ""]
        lines += latency_table(sh["throughput"], sh["latency_at_half_saturation_us"],
                               ("direct", "nginx", "fencegate"))
        lines += ["", "| ratio, shared setup | PUT | GET |", "|---|---:|---:|"]
        for key, label in (("throughput_vs_nginx", "throughput fencegate / nginx, in turn"),
                           ("cpu_per_request_vs_nginx", "CPU per request fencegate / nginx, in turn"),
                           ("p99_vs_nginx", "p99 fencegate / nginx")):
            lines.append(f"| {label} | {sh['ratios']['PUT'][key]:.2f} | "
                         f"{sh['ratios']['GET'][key]:.2f} |")
    if "paired" in summary:
        lines += ["", "At the same moment (`bench/paired.sh`: nginx and fencegate on the same cores, "
                  "each saturated by its own wrk, both at once; medians of the rounds):", "",
                  "| setup | requests | rounds | nginx req/s | fencegate req/s | throughput / nginx "
                  "| nginx CPU µs/req | fencegate CPU µs/req | CPU per request / nginx |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for key, row in summary["paired"].items():
            label = "fenced PUT" if row["requests"] == "put" else "unfenced GET"
            lines.append(f"| {row['setup']} | {label} | {row['rounds']} | {row['nginx_per_s']:,.0f} | "
                         f"{row['fencegate_per_s']:,.0f} | **{row['throughput_vs_nginx']:.3f}** | "
                         f"{row['nginx_cpu_us']:.2f} | {row['fencegate_cpu_us']:.2f} | "
                         f"{row['cpu_per_request_vs_nginx']:.3f} |")
    a, z, m, s = (summary[k] for k in ("advances", "rejections", "memory", "startup"))
    lines += [
        "",
        "| scenario | figure |",
        "|---|---|",
        f"| durable epoch advances | {a['per_second']:,}/s (p99 {a['p99_us']:,} µs) |",
        f"| audited rejections (zombie storm) | {z['per_second']:,}/s (p99 {z['p99_us']:,} µs; "
        f"{z['answered_409']:,} answered 409, {z['audit_rows']:,} audit rows) |",
        f"| RSS with {m['resources']:,} resources resident | {m['rss_mib']} MiB (peak {m['peak_rss_mib']} MiB; "
        f"idle at start {m['idle_rss_mib']} MiB; filled in {m['fill_seconds']} s) |",
        f"| start-up with {m['resources']:,} resources stored | {s['ready_s_max'] * 1000:.0f} ms "
        f"to /readyz, slowest of {len(s['ready_s'])} (first audited 409 by "
        f"{max(s['first_409_s']) * 1000:.0f} ms) |",
    ]
    p = summary["profile"]
    if p:
        lines += [
            f"| etcd put through the etcd-v3 profile | {p['etcd_put']:,}/s, "
            f"{p['etcd_put'] / p['plain_put']:.2f} x the same call through a path route "
            f"({p['plain_put']:,}/s) |",
            f"| etcd txn of 100 keys (100 resources) through the profile | "
            f"{p['etcd_txn100']:,}/s ({p['etcd_txn100'] * 100:,} keys fenced/s) |",
        ]
    if p.get("couch_put"):
        lines += [
            f"| CouchDB document PUT through the couchdb profile | {p['couch_put']:,}/s, "
            f"{p['couch_put'] / p['couch_plain_put']:.2f} x the same call through a path route "
            f"({p['couch_plain_put']:,}/s) |",
            f"| CouchDB _bulk_docs of 100 documents through the profile | "
            f"{p['couch_bulk100']:,}/s ({p['couch_bulk100'] * 100:,} documents fenced/s) |",
            f"| S3 PutObject through the s3 profile | {p['s3_put']:,}/s, "
            f"{p['s3_put'] / p['s3_plain_put']:.2f} x the same call through a path route "
            f"({p['s3_plain_put']:,}/s) |",
            f"| S3 DeleteObjects of 100 keys through the profile | "
            f"{p['s3_delete100']:,}/s ({p['s3_delete100'] * 100:,} keys fenced/s) |",
        ]
    lines += [
        "",
        "| target | met |",
        "|---|---|",
    ]
    for label, check in TARGET_CHECKS:
        lines.append(f"| {label} | {'yes' if check(summary) else '**no**'} |")
    return "\n".join(lines) + "\n"


def main():
    raw, out, proxy_cpus, load_cpus, workers, connections, duration = sys.argv[1:]
    rows = [json.loads(line) for line in Path(raw).read_text().splitlines()]
    summary = summarise(rows)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    setup = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": f"{platform.node()}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores",
        "commit": commit,
        # bench/run.sh's BINARY argument, if one was given.
        "build": os.environ.get("BENCH_BUILD") or "release build",
        "proxy_cpus": proxy_cpus,
        "load_cpus": load_cpus,
        "workers": int(workers),
        "connections": int(connections),
        "duration_s": int(duration),
        "latency_rounds": int(os.environ.get("BENCH_LATENCY_ROUNDS", "3")),
    }
    summary["targets_met"] = {label: check(summary) for label, check in TARGET_CHECKS}
    Path(out, "run.json").write_text(json.dumps({"setup": setup, "summary": summary,
                                                  "raw": rows}, indent=2) + "\n")
    Path(out, "run.md").write_text(markdown(summary, setup))
    print(Path(out, "run.md").read_text())


if __name__ == "__main__":
    main()
