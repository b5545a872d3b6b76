#!/usr/bin/env python3
"""Prints the tables of loadtest/compare.sh from its results file (standard library only).

    report.py compare RESULTS.tsv NOTES.txt "SETUP LINE"
    report.py soak RESULTS.tsv

RESULTS.tsv lines: scenario <TAB> target <TAB> round <TAB> metric <TAB> value.
Values are medians over the rounds; a ratio is computed per round (servers run interleaved,
so each round's numbers share the machine's state) and quoted as the median with the
min-max spread over the rounds.
"""

import collections
import statistics
import sys

PEERS = ("nginx", "varnish", "floor")


def load(path):
    data = collections.defaultdict(dict)  # (scenario, target, metric) -> {round: value}
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 5:
                continue
            scen, target, rnd, metric, value = parts
            try:
                data[(scen, target, metric)][int(rnd)] = float(value)
            except ValueError:
                pass
    return data


def median(values):
    return statistics.median(values) if values else None


def fmt_value(v, unit):
    if v is None:
        return "N/A"
    if unit == "rps":
        return f"{v:,.0f}"
    if unit == "calls":
        return f"{v:.0f}" if v == int(v) else f"{v:.2f}"
    if unit == "ratio":
        return f"{v:.2f}"
    if unit == "us":
        return f"{v:.1f}"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"  # ms


def ratios(data, scen, metric, a, b, b_scen=None):
    """Per-round ratios a/b (b may come from another scenario, e.g. the static ceiling)."""
    xa = data.get((scen, a, metric), {})
    xb = data.get((b_scen or scen, b, metric), {})
    out = [xa[r] / xb[r] for r in sorted(xa) if r in xb and xb[r] > 0]
    return out


def fmt_ratio(rs):
    if not rs:
        return "N/A"
    m = median(rs)
    if len(rs) == 1:
        return f"{m:.2f}x"
    return f"{m:.2f}x ({min(rs):.2f}-{max(rs):.2f})"


def values(data, scen, target, metric):
    return [v for _, v in sorted(data.get((scen, target, metric), {}).items())]


def cell(data, scen, target, metric, unit):
    vs = values(data, scen, target, metric)
    if not vs:
        return "N/A"
    if unit == "calls" and len(vs) > 1:
        lo, hi = min(vs), max(vs)
        return fmt_value(lo, unit) if lo == hi else f"{fmt_value(lo, unit)}-{fmt_value(hi, unit)}"
    return fmt_value(median(vs), unit)


def compare(results, notes_path, setup):
    data = load(results)
    w_label, w_val, w_ratio = 46, 10, 19
    head = (f"{'':{w_label}} {'stoa':>{w_val}} {'nginx':>{w_val}} {'Varnish':>{w_val}} {'floor':>{w_val}}"
            f"   {'stoa/nginx':<{w_ratio}} {'stoa/Varnish':<{w_ratio}} {'stoa/floor':<{w_ratio}}")
    print(setup)
    print("values: medians over the rounds; ratios: per-round median (min-max); requests/s: higher is"
          " better, ms, CPU µs per request and upstream calls: lower is better")
    print("CPU µs per request: the server's user + system CPU time over a run (/proc/PID/stat, its"
          " processes and threads) divided by the requests wrk completed")
    print()
    print(head)
    print("-" * len(head))

    def row(label, scen, metric, unit):
        cells = [cell(data, scen, t, metric, unit) for t in ("stoa",) + PEERS]
        rs = [fmt_ratio(ratios(data, scen, metric, "stoa", p)) for p in PEERS]
        if not values(data, scen, "floor", metric):
            rs[2] = ""
        print(f"{label:<{w_label}} {cells[0]:>{w_val}} {cells[1]:>{w_val}} {cells[2]:>{w_val}}"
              f" {cells[3] if cells[3] != 'N/A' else '':>{w_val}}"
              f"   {rs[0]:<{w_ratio}} {rs[1]:<{w_ratio}} {rs[2]:<{w_ratio}}")

    def section(title):
        print(title)

    section("cache hit, one key (wrk)")
    row("  requests/s", "hit", "rps", "rps")
    row("  p50 ms", "hit", "p50", "ms")
    row("  p99 ms", "hit", "p99", "ms")
    row("  CPU µs per request", "hit", "cpu_us", "us")
    row("  requests/s, oha -c50 (a second client)", "hit_oha", "rps", "rps")
    row("  p99 ms, oha", "hit_oha", "p99", "ms")
    static = median(values(data, "hit", "static", "rps"))
    st = fmt_ratio(ratios(data, "hit", "rps", "stoa", "static"))
    print(f"{'  ceiling: nginx static return 200, requests/s':<{w_label}} {'':>{w_val}} "
          f"{fmt_value(static, 'rps'):>{w_val}} {'':>{w_val}}   stoa/ceiling {st}")
    if values(data, "pipe_hit", "stoa", "rps"):
        section("pipelined, 16 requests written at once per connection (wrk -s pipeline.lua)")
        row("  cache hits, requests/s", "pipe_hit", "rps", "rps")
        row("  cache hits, CPU µs per request", "pipe_hit", "cpu_us", "us")
        row("  pass-through, requests/s", "pipe_pass", "rps", "rps")
        row("  pass-through, CPU µs per request", "pipe_pass", "cpu_us", "us")
    section("pass-through, no cache (wrk, upstream keep-alive; floor: bare pingora, loadtest/floor)")
    row("  requests/s", "pass", "rps", "rps")
    row("  p50 ms", "pass", "p50", "ms")
    row("  p99 ms", "pass", "p99", "ms")
    row("  CPU µs per request", "pass", "cpu_us", "us")
    o_rps = median(values(data, "pass", "origin", "rps"))
    o_cpu = median(values(data, "pass", "origin", "cpu_us"))
    p_max = max([median(values(data, "pass", t, "rps")) or 0 for t in ("stoa",) + PEERS + ("lean", "raw")])
    o_ok = "" if o_rps is None else (
        f" ({o_rps / p_max:.1f}x the fastest proxy: not the bottleneck)" if p_max and o_rps >= 1.5 * p_max
        else " (less than 1.5x the fastest proxy: it may limit the rows above)")
    print(f"  the origin alone (nginx static file): {fmt_value(o_rps, 'rps')} requests/s,"
          f" {fmt_value(o_cpu, 'us')} CPU µs per request{o_ok}")
    if values(data, "pass", "lean", "rps"):
        l_rps = median(values(data, "pass", "lean", "rps"))
        l_p99 = median(values(data, "pass", "lean", "p99"))
        l_cpu = median(values(data, "pass", "lean", "cpu_us"))
        print(f"  lean: the floor on pingora-core's HTTP/1 sessions (stoa-floor --path lean):"
              f" {fmt_value(l_rps, 'rps')} requests/s, p99 {fmt_value(l_p99, 'ms')} ms,"
              f" {fmt_value(l_cpu, 'us')} CPU µs per request; lean/floor requests/s"
              f" {fmt_ratio(ratios(data, 'pass', 'rps', 'lean', 'floor'))},"
              f" CPU {fmt_ratio(ratios(data, 'pass', 'cpu_us', 'lean', 'floor'))};"
              f" stoa/lean {fmt_ratio(ratios(data, 'pass', 'rps', 'stoa', 'lean'))}")
    if values(data, "pass", "raw", "rps"):
        r_rps = median(values(data, "pass", "raw", "rps"))
        r_cpu = median(values(data, "pass", "raw", "cpu_us"))
        print(f"  raw: pingora's listener with no HTTP session (stoa-floor --path raw):"
              f" {fmt_value(r_rps, 'rps')} requests/s, {fmt_value(r_cpu, 'us')} CPU µs per request;"
              f" raw/nginx CPU {fmt_ratio(ratios(data, 'pass', 'cpu_us', 'raw', 'nginx'))};"
              f" stoa/raw CPU {fmt_ratio(ratios(data, 'pass', 'cpu_us', 'stoa', 'raw'))}")
    section("stampede: 1,000 clients, one cold key, slow upstream")
    row("  upstream calls per stampede", "stampede", "upstream_calls", "calls")
    row("  p50 ms (connected first, then fired)", "stampede", "p50", "ms")
    row("  p99 ms (connected first, then fired)", "stampede", "p99", "ms")
    row("  upstream calls, hey -n 1000 -c 1000", "stampede_hey", "upstream_calls", "calls")
    row("  p99 ms, hey (connect included)", "stampede_hey", "p99", "ms")
    section("expiry under load: 1 s TTL + stale, slow upstream (wrk)")
    row("  upstream calls per 1 s TTL window", "expiry", "calls_per_window", "calls")
    row("  upstream calls at once, most", "expiry", "max_in_flight", "calls")
    row("  p50 ms", "expiry", "p50", "ms")
    row("  p99 ms", "expiry", "p99", "ms")
    print("  (a refresh takes the upstream's latency, so one per expiry is 1/(TTL + latency) per second;"
          " nginx counts validity in whole seconds, so its 1 s entries live 1-2 s)")
    section("GET with a JSON body (CLV), cache hit (wrk -s clv.lua)")
    row("  requests/s", "clv", "rps", "rps")
    row("  p99 ms", "clv", "p99", "ms")
    row("  CPU µs per request", "clv", "cpu_us", "us")

    sizes = {t: values(data, "info", t, "body_bytes") for t in ("stoa",) + PEERS}
    print("answer bytes on the hit path: " + ", ".join(
        f"{t} {int(v[0])}" for t, v in sizes.items() if v))

    print()
    vhead = (f"{'stoa variants, cache hits':<{w_label}} {'requests/s':>{w_val}} {'p99 ms':>{w_val}}"
             f" {'CPU µs/req':>{w_val}}   vs stoa (requests/s)")
    print(vhead)
    print("-" * len(vhead))
    for label, t in (("stoa: metrics on, access log off (above)", "stoa"),
                     ("stoa: metrics and access log off", "bare"),
                     ("stoa: metrics and JSON access log on", "logged"),
                     ("stoa: + generous per-client rate limit", "limited")):
        rps = median(values(data, "hit", t, "rps"))
        p99 = median(values(data, "hit", t, "p99"))
        cpu = median(values(data, "hit", t, "cpu_us"))
        rel = fmt_ratio(ratios(data, "hit", "rps", t, "stoa")) if t != "stoa" else ""
        print(f"{label:<{w_label}} {fmt_value(rps, 'rps'):>{w_val}} {fmt_value(p99, 'ms'):>{w_val}}"
              f" {fmt_value(cpu, 'us'):>{w_val}}   {rel}")
    rs = ratios(data, "hit", "rps", "logged", "bare")
    print(f"{'metrics + access log on / both off':<{w_label}} {'':>{w_val}} {'':>{w_val}} {'':>{w_val}}   {fmt_ratio(rs)}")
    lines = sum(values(data, "hit", "logged", "access_lines"))
    served = sum(values(data, "hit", "logged", "requests"))
    dropped = values(data, "hit", "logged", "access_dropped")
    print(f"access log of the JSON row: {lines:,.0f} lines written for {served:,.0f} requests wrk completed"
          f" (in-flight ones at a run's end are logged too); {dropped[0] if dropped else 0:,.0f} dropped")

    # Targets.
    print()
    print("targets")

    def verdict(ok):
        return "n/a " if ok is None else ("PASS" if ok else "MISS")

    def target(text, ok, detail):
        print(f"  [{verdict(ok)}] {text}: {detail}")

    r = ratios(data, "hit", "rps", "stoa", "nginx")
    target("cache hits >= 1.2x nginx", median(r) >= 1.2 if r else None, fmt_ratio(r))
    r = ratios(data, "hit", "cpu_us", "stoa", "nginx")
    target("CPU per cache hit <= 0.75x nginx's", median(r) <= 0.75 if r else None, "CPU " + fmt_ratio(r))
    r = ratios(data, "hit", "p99", "stoa", "nginx")
    target("cache-hit p99 no worse than nginx", median(r) <= 1.0 if r else None, "p99 " + fmt_ratio(r))
    calls = values(data, "stampede", "stoa", "upstream_calls") + values(data, "stampede_hey", "stoa", "upstream_calls")
    target("stampede: exactly 1 upstream call", all(c == 1 for c in calls) if calls else None,
           "calls per stampede " + (",".join(f"{c:.0f}" for c in calls) or "N/A"))
    r = ratios(data, "stampede", "p99", "stoa", "varnish")
    target("stampede p99 below Varnish's", median(r) < 1.0 if r else None, "p99 " + fmt_ratio(r))
    cpw = values(data, "expiry", "stoa", "calls_per_window")
    mif = values(data, "expiry", "stoa", "max_in_flight")
    target("expiry: at most 1 upstream call per TTL window",
           (max(cpw) <= 1.0 and max(mif) <= 1) if cpw and mif else None,
           f"{fmt_value(median(cpw), 'calls')} per window, at most {fmt_value(max(mif) if mif else None, 'calls')} at once")
    p99 = values(data, "expiry", "stoa", "p99")
    target("expiry: client p99 < 10 ms", max(p99) < 10.0 if p99 else None, f"{fmt_value(median(p99), 'ms')} ms")
    r = ratios(data, "pass", "rps", "stoa", "nginx")
    target("pass-through >= 1.0x nginx proxy_pass (keep-alive)", median(r) >= 1.0 if r else None, fmt_ratio(r))
    r = ratios(data, "pass", "rps", "stoa", "floor")
    target("pass-through >= 0.9x the floor", median(r) >= 0.9 if r else None, fmt_ratio(r))
    r = ratios(data, "pass", "cpu_us", "stoa", "nginx")
    target("pass-through CPU per request within 1.25x nginx's", median(r) <= 1.25 if r else None,
           "CPU " + fmt_ratio(r))
    r = ratios(data, "pass", "rps", "stoa", "nginx")
    target("pass-through requests/s >= 0.9x nginx's", median(r) >= 0.9 if r else None, fmt_ratio(r))
    for scen, what in (("pipe_hit", "cache hits"), ("pipe_pass", "pass-through")):
        errs = values(data, scen, "stoa", "socket_errors")
        r = ratios(data, scen, "rps", "stoa", "nginx")
        target(f"pipelined {what}: every request answered (no socket error)",
               (max(errs) == 0) if errs else None,
               f"{max(errs) if errs else 0:.0f} errors at most in a round; requests/s {fmt_ratio(r)}")
    r = ratios(data, "hit", "rps", "logged", "bare")
    target("JSON access log on <= 10% below off (metrics + log on / both off)",
           median(r) >= 0.9 if r else None, fmt_ratio(r))

    try:
        with open(notes_path) as f:
            notes = [line.rstrip("\n") for line in f if line.strip()]
    except OSError:
        notes = []
    if notes:
        print()
        print("notes")
        for n in notes:
            print("  - " + n)


def soak(results):
    data = load(results)
    p99 = values(data, "soak", "stoa", "p99")
    rss = [v / 1024 for v in values(data, "soak", "stoa", "rss_kb")]
    if len(p99) < 2:
        print("soak: fewer than two samples")
        return
    # A minute of each server's samples (one 10 s sample of each per 20 s), or half the run.
    k = min(3, len(p99) // 2)
    span = "minute" if k == 3 else f"{k * 20} s"

    # Medians, as everywhere in these scripts: one sample disturbed by the machine (a 10 s
    # p99 is one slow moment) does not move the figure.
    def drift(series):
        first, last = statistics.median(series[:k]), statistics.median(series[-k:])
        pct = (last - first) / first * 100 if first else float("nan")
        return first, last, pct

    print()
    print(f"drift, first {span} vs last {span} (medians of {k} samples of each server)")
    for name, series, unit in (("p99", p99, "ms"), ("stoa RSS", rss, "MiB")):
        first, last, pct = drift(series)
        ok = pct < 10.0
        ratio = f"{last / first:.3f}x" if first else "N/A"
        print(f"  [{'PASS' if ok else 'MISS'}] {name}: {first:.2f} {unit} -> {last:.2f} {unit},"
              f" last/first {ratio} ({pct:+.1f}%; target < +10%)")
    # Not targets: the same drifts of nginx under the same mix, sampled in turn with stoa,
    # and stoa's drift divided by nginx's: what is left once the machine's own drift is out.
    for metric, label, unit in (("p99", "p99", " ms"), ("rps", "requests/s", ""),
                                ("cpu_us", "CPU us per request", " us")):
        row = []
        for target in ("stoa", "nginx"):
            series = values(data, "soak", target, metric)
            if len(series) >= 2 * k:
                first, last, pct = drift(series)
                row.append((target, first, last, pct))
        for target, first, last, pct in row:
            print(f"  [info] {target} {label}: {first:,.2f}{unit} -> {last:,.2f}{unit} ({pct:+.1f}%)")
        if len(row) == 2 and all(r[1] for r in row):
            rel = (row[0][2] / row[0][1]) / (row[1][2] / row[1][1])
            if metric == "p99":
                # The machine's own drift taken out: nginx ran the same mix in turn with stoa.
                ok = rel < 1.10
                print(f"  [{'PASS' if ok else 'MISS'}] stoa's p99 drift over nginx's: {rel:.3f}x"
                      f" ({(rel - 1) * 100:+.1f}%; target < +10%)")
            else:
                print(f"  [info] stoa's {label} drift over nginx's: {rel:.3f}x")
    bad = values(data, "soak", "stoa", "non2xx")
    rps = values(data, "soak", "stoa", "rps")
    if bad and rps:
        total = sum(r * 10 for r in rps)
        print(f"  stoa's non-2xx answers (the rate-limited share, 429): {sum(bad) / total * 100:.1f}% of ~{total:,.0f}")


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "soak":
        soak(sys.argv[2])
    elif len(sys.argv) >= 5 and sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
