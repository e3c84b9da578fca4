"""Draw PNG plots from bench/results/*.json (matplotlib, Agg backend: no display needed).

    python bench/plot.py [--results DIR] [--out DIR]

Writes, for each results file present:

- ``density.png``: memory per live sandbox vs N for each mode (log-log), and
  sandboxes per GiB at the largest N each mode reached;
- ``latency.png``: p50 bars with p99 whiskers for every latency row (log scale),
  the bare-KVM floor marked;
- ``restore.png``: restore() time vs dirty pages for 16 MiB and 1 GiB guests,
  copy-back and drop policies (p50, whiskers to p90);
- ``throughput.png``: Pool calls/s vs workers, with Sandbox.call in one
  process and the floor for reference.

Each plot is footnoted with the machine it was measured on and the time.
It also writes ``summary.md``: the headline tables as Markdown, with the
machine, ready to paste into bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = Path(os.environ.get("HLPOOL_BENCH_RESULTS") or BENCH_DIR / "results").resolve()

MODE_STYLE = {
    "shared": ("tab:blue", "o", "-"),
    "private": ("tab:red", "s", "-"),
    "floor-file": ("tab:cyan", "v", "--"),
    "floor-anon": ("tab:orange", "^", "--"),
    "wasmtime": ("tab:green", "D", "-"),
}
GROUP_COLORS = {
    "floor": "0.55",
    "call": "tab:blue",
    "restore": "tab:purple",
    "create": "tab:brown",
    "pool": "tab:olive",
    "wasm": "tab:green",
}


def machine_line(doc: dict[str, Any]) -> str:
    m = doc.get("machine", {})
    return (f"{m.get('cpu_model', '?')}, {m.get('cpu_count', '?')} CPUs, {m.get('memory_total_gib', '?')} GiB, "
            f"Linux {m.get('kernel', '?')}, KVM {m.get('kvm_flavour', '?')}, Python {m.get('python', '?')}; "
            f"{doc.get('timestamp_utc', '')}" + (" (--quick)" if doc.get("data", {}).get("quick") else ""))


def _footnote(fig: Any, doc: dict[str, Any]) -> None:
    fig.text(0.01, 0.005, machine_line(doc), fontsize=7, color="0.35", ha="left", va="bottom")


def _thousands(x: float, _pos: Any = None) -> str:
    if x >= 1:
        return f"{x:,.0f}"
    return f"{x:g}"


def plot_density(doc: dict[str, Any], out: Path) -> Path:
    d = doc["data"]
    s = d["summary"]
    g = d["guest"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.4), gridspec_kw={"width_ratios": [3, 2]})
    ends: list[tuple[float, int, str, str]] = []
    for mode in d["modes"]:
        by_n = s[mode]["by_n"]
        ns = sorted(int(n) for n in by_n)
        ys = [by_n[str(n)]["per_sandbox_kib"]["total"] for n in ns]
        pts = [(n, y) for n, y in zip(ns, ys) if y > 0]  # N=1 can read 0 (charge batching)
        if not pts:
            continue
        color, marker, ls = MODE_STYLE.get(mode, ("k", "o", "-"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=ls, color=color,
                label=f"{mode}: {s[mode]['label']}")
        n_last, y_last = pts[-1]
        stopped = " (budget)" if s[mode].get("stopped") else ""
        ends.append((y_last, n_last, f"{y_last:,.0f} KiB{stopped}", color))
    # End labels, nudged apart (log scale) where lines end close together.
    placed: list[float] = []
    for y_last, n_last, text, color in sorted(ends, key=lambda e: e[0]):
        y_text = max(y_last, placed[-1] * 1.2) if placed else y_last
        placed.append(y_text)
        ax.annotate(text, (n_last, y_last), xytext=(n_last * 1.15, y_text), fontsize=8, color=color,
                    va="center")
    ax.set_xscale("log")
    ax.set_yscale("log")
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi * 3)  # room for the end labels
    ax.xaxis.set_major_formatter(FuncFormatter(_thousands))
    ax.yaxis.set_major_formatter(FuncFormatter(_thousands))
    ax.set_xlabel("live sandboxes N (each served one call)")
    ax.set_ylabel(f"host memory per sandbox, KiB ({'cgroup charge' if d.get('cgroup') else 'MemAvailable'} delta / N)")
    ax.set_title(f"Memory per sandbox vs N ({g['table_mib']} MiB rodata + {g['data_mib']} MiB data image, "
                 f"{d['workers']} workers)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")

    modes, per_gib, labels = [], [], []
    for mode in d["modes"]:
        m = s[mode]
        if not m["by_n"]:
            continue
        n = str(m["max_n"])
        v = m["by_n"][n]["per_sandbox_kib"]["per_gib"]
        if not v or v != v:
            continue
        modes.append(mode)
        per_gib.append(v)
        labels.append(f"N={n}")
    colors = [MODE_STYLE.get(m, ("k",))[0] for m in modes]
    bars = bx.barh(modes, per_gib, color=colors)
    bx.set_xscale("log")
    bx.xaxis.set_major_formatter(FuncFormatter(_thousands))
    bx.invert_yaxis()
    for bar, v, lab in zip(bars, per_gib, labels):
        bx.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:,.0f}/GiB ({lab})", va="center",
                fontsize=8)
    bx.set_xlim(right=max(per_gib) * 12 if per_gib else None)
    bx.set_xlabel("sandboxes per GiB of host memory (at the largest N reached)")
    bx.set_title("Density", fontsize=10)
    bx.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _footnote(fig, doc)
    path = out / "density.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(doc: dict[str, Any], out: Path) -> Path:
    d = doc["data"]
    rows = []
    for f in d["floor"].values():
        rows.append((f"[floor] {f['label']}", "floor", f["latency"]))
    for c in d["cases"]:
        rows.append((c["label"], c.get("group", "call"), c["latency"]))
    labels = [r[0] for r in rows]
    p50 = [r[2]["p50_us"] for r in rows]
    p99 = [r[2]["p99_us"] for r in rows]
    colors = [GROUP_COLORS.get(r[1], "k") for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.34 * len(rows) + 1.6))
    y = range(len(rows))
    ax.barh(list(y), p50, color=colors, alpha=0.85)
    ax.errorbar(p50, list(y), xerr=[[0] * len(rows), [max(0.0, b - a) for a, b in zip(p50, p99)]], fmt="none",
                ecolor="0.2", capsize=3, linewidth=1)
    for yi, a, b in zip(y, p50, p99):
        ax.text(b * 1.08, yi, f"{a:,.0f} / {b:,.0f}" if a >= 10 else f"{a:.1f} / {b:,.0f}", va="center",
                fontsize=7.5)
    floor = d["floor"]["run"]["latency"]["p50_us"]
    ax.axvline(floor, color="0.4", linestyle=":", linewidth=1)
    ax.text(floor, -0.9, f" floor p50 {floor:.0f} us", fontsize=7.5, color="0.3")
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(_thousands))
    ax.set_xlim(right=max(p99) * 4)
    ax.set_xlabel("microseconds (bar: p50, whisker: p99; labels p50 / p99)")
    groups = d.get("groups", {})
    handles = [plt.Rectangle((0, 0), 1, 1, color=GROUP_COLORS[gname]) for gname in GROUP_COLORS
               if any(r[1] == gname for r in rows)]
    names = [groups.get(gname, gname) for gname in GROUP_COLORS if any(r[1] == gname for r in rows)]
    ax.legend(handles, names, fontsize=8, loc="lower right")
    ax.set_title(f"Latency, one run, interleaved ({d['iterations']} per cheap row)", fontsize=10)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _footnote(fig, doc)
    path = out / "latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_restore(doc: dict[str, Any], out: Path) -> Path:
    d = doc["data"]
    fig, ax = plt.subplots(figsize=(9, 5.4))
    styles = {("16MiB", "copy"): ("tab:blue", "o", "-"), ("1GiB", "copy"): ("tab:red", "s", "-"),
              ("16MiB", "drop"): ("tab:blue", "o", "--"), ("1GiB", "drop"): ("tab:red", "s", "--")}
    for key, case in d["cases"].items():
        xs, ys, up = [], [], []
        for n in d["ns"]:
            row = case["by_n"][str(n)]
            dirty = (row.get("restore_stats") or {}).get("dirty") or row["n_effective"]
            xs.append(dirty)
            ys.append(row["restore"]["p50_us"])
            up.append(max(0.0, row["restore"]["p90_us"] - row["restore"]["p50_us"]))
        color, marker, ls = styles.get((case["size"], case["policy"]), ("k", "o", "-"))
        small = case["size"] == "16MiB"  # drawn wide and hollow, so the 1 GiB line on top leaves it visible
        ax.errorbar(xs, ys, yerr=[[0] * len(ys), up], color=color, marker=marker, linestyle=ls, capsize=2,
                    markersize=10 if small else 4, markerfacecolor="none" if small else color,
                    linewidth=4 if small else 1.3, alpha=0.45 if small else 1.0,
                    label=f"{case['size']} guest, {'copy-back' if case['policy'] == 'copy' else 'drop'}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(_thousands))
    ax.yaxis.set_major_formatter(FuncFormatter(_thousands))
    ax.set_xlabel("pages restored (the n touched + the pages every call writes)")
    ax.set_ylabel("restore() time, us (p50; whisker to p90)")
    ax.set_title("Restore cost follows the dirty pages, not the guest's size (16 MiB and 1 GiB lines overlap)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _footnote(fig, doc)
    path = out / "restore.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput(doc: dict[str, Any], out: Path) -> Path:
    d = doc["data"]
    fig, ax = plt.subplots(figsize=(8, 5))
    workers = sorted(int(w) for w in d["workers"])
    functions = d.get("functions") or [k for k in d["workers"][str(workers[0])] if k != "stats"]
    top = 0.0
    for fn, color in zip(functions, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        rates = [d["workers"][str(w)][fn]["calls_per_s"] for w in workers]
        top = max(top, *rates)
        ax.plot(workers, rates, marker="o", color=color, label=f"Pool.submit({fn})")
        for w, r in zip(workers, rates):
            ax.annotate(f"{r:,.0f}", (w, r), textcoords="offset points", xytext=(5, 5), fontsize=8, color=color)
    local = d.get("sandbox_call", {}).get("calls_per_s")
    if local:
        top = max(top, local)
        ax.axhline(local, color="tab:purple", linestyle="--", linewidth=1)
        ax.text(workers[0], local, f" Sandbox.call(noop) in one process: {local:,.0f}/s", fontsize=8,
                color="tab:purple", va="bottom")
    floor = d.get("floor", {}).get("calls_per_s_at_p50")
    if floor:
        top = max(top, floor)
        ax.axhline(floor, color="0.5", linestyle=":", linewidth=1)
        ax.text(workers[0], floor, f" bare KVM exit floor (1e6/p50): {floor:,.0f}/s", fontsize=8, color="0.35",
                va="bottom")
    ax.set_xticks(workers)
    ax.set_ylim(0, top * 1.15)
    ax.yaxis.set_major_formatter(FuncFormatter(_thousands))
    ax.set_xlabel("pool workers")
    ax.set_ylabel(f"calls/s ({d.get('window', 64)} outstanding)")
    ax.set_title("Pool throughput vs workers", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _footnote(fig, doc)
    path = out / "throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- Markdown summary --------------------------------------------------------------------------------

def _n(v: Any, digits: int = 0) -> str:
    if v is None or v != v:
        return "-"
    if digits == 0 and abs(v) >= 10:
        return f"{v:,.0f}"
    return f"{v:,.{max(digits, 1)}f}" if abs(v) < 100 else f"{v:,.0f}"


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def md_density(doc: dict[str, Any]) -> str:
    d = doc["data"]
    s = d["summary"]
    modes = d["modes"]
    rows = []
    for n in d["counts"]:
        row = [str(n)]
        for m in modes:
            e = s[m]["by_n"].get(str(n))
            row.append(_n(e["per_sandbox_kib"]["total"]) if e else "-")
        rows.append(row)
    out = [f"Total host memory per live sandbox, KiB ({d['total_is']} / N), by N:", "",
           _md_table(["N", *[f"`{m}`" for m in modes]], rows), ""]
    rows = []
    for m in modes:
        if not s[m]["by_n"]:
            continue
        n = str(s[m]["max_n"])
        e = s[m]["by_n"][n]
        p = e["per_sandbox_kib"]
        ratio = e.get("ratio_to_shared", {}).get("total")
        rows.append([f"`{m}`", s[m]["label"], n, _n(p["total"]), _n(p["pss"]), _n(p["kernel"]),
                     _n(p.get("cgroup_kmem")), _n(p["per_gib"]), _n(ratio, 2) if ratio else "-",
                     _n(e["make_p50_us"] / 1000, 1)])
    out += ["At the largest N each mode reached:", "",
            _md_table(["mode", "what", "N", "total KiB/sb", "Pss KiB/sb", "kernel KiB/sb", "kmem KiB/sb",
                       "sandboxes/GiB", "x shared", "create+call p50 ms"], rows)]
    rows = []
    for n in d["counts"]:
        row = [str(n)]
        for m in modes:
            e = s[m]["by_n"].get(str(n))
            row.append(f"{_n(e['grow_ms_per_new_sandbox'], 1)} ms / {_n(e['kdamond_cpu_s'], 1)} s"
                       if e and "grow_ms_per_new_sandbox" in e else "-")
        rows.append(row)
    out += ["", f"Growing to N: wall time per added sandbox ({d['workers']} workers in parallel) / CPU time of the "
            "kernel's DAMON thread (kdamond) during that step:", "",
            _md_table(["N", *[f"`{m}`" for m in modes]], rows)]
    stops = [f"`{m}` stopped before N={st['before_n']}: {st['reason']}" for m in modes for st in s[m]["stopped"]]
    if stops:
        out += ["", *[f"- {x}" for x in stops]]
    return "\n".join(out)


def md_latency(doc: dict[str, Any]) -> str:
    d = doc["data"]
    rows = []
    for f in d["floor"].values():
        lat = f["latency"]
        rows.append([f"floor: {f['label']}", _n(lat["p50_us"], 1), _n(lat["p99_us"], 1),
                     _n(f["ratio_to_floor_p50"], 2)])
    for c in d["cases"]:
        lat = c["latency"]
        group = c.get("group", "call")
        if group == "call":
            label = f"`Sandbox.call`: `{c['label']}`"
        elif group in ("restore", "create"):
            label = f"{d.get('groups', {}).get(group, group)}: `{c['label']}`"
        else:
            label = f"`{c['label']}`"
        rows.append([label, _n(lat["p50_us"], 1), _n(lat["p99_us"], 1), _n(c["ratio_to_floor_p50"], 2)])
    return _md_table(["what", "p50 us", "p99 us", "p50 x floor"], rows)


def md_throughput(doc: dict[str, Any]) -> str:
    d = doc["data"]
    fns = d.get("functions") or ["noop"]
    rows = [["floor: bare KVM_RUN + out (1e6 / p50)", "-", _n(d["floor"]["calls_per_s_at_p50"]),
             _n(d["floor"]["latency"]["p50_us"], 1)],
            ["`Sandbox.call(noop)` in one process", "-", _n(d["sandbox_call"]["calls_per_s"]),
             _n(d["sandbox_call"]["latency"]["p50_us"], 1)]]
    for fn in fns:
        for w in sorted(d["workers"], key=int):
            e = d["workers"][w][fn]
            rows.append([f"`Pool.submit({fn})`", w, _n(e["calls_per_s"]), _n(e["latency"]["p50_us"], 1)])
    return _md_table(["what", "workers", "calls/s", "p50 us (one at a time)"], rows)


def md_restore(doc: dict[str, Any]) -> str:
    d = doc["data"]
    cases = d["cases"]
    rows = []
    for n in d["ns"]:
        row = [str(n)]
        for key in ("16MiB/copy", "1GiB/copy", "16MiB/drop", "1GiB/drop"):
            r = cases[key]["by_n"][str(n)]
            row.append(_n(r["restore"]["p50_us"], 1) + ("*" if r["capped"] else ""))
        rows.append(row)
    return _md_table(["pages touched", "16 MiB copy-back", "1 GiB copy-back", "16 MiB drop", "1 GiB drop"], rows)


SUMMARIES = {"density": md_density, "latency": md_latency, "throughput": md_throughput, "restore": md_restore}


def write_summary(results: Path, out: Path) -> Path | None:
    parts = []
    machines = {}
    for name, fn in SUMMARIES.items():
        src = results / f"{name}.json"
        if not src.exists():
            continue
        doc = json.loads(src.read_text())
        try:
            body = fn(doc)
        except (KeyError, TypeError, ValueError) as exc:
            print(f"{src}: no summary ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        machines[name] = machine_line(doc)
        parts.append(f"### {name}\n\n`bench/{name}.py` ({machines[name]})\n\n{body}\n")
    if not parts:
        return None
    path = out / "summary.md"
    path.write_text("<!-- generated by bench/plot.py from bench/results/*.json -->\n\n" + "\n".join(parts))
    return path


PLOTS = {
    "density": plot_density,
    "latency": plot_latency,
    "restore": plot_restore,
    "throughput": plot_throughput,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="draw PNG plots from bench/results/*.json")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="directory with the JSON results")
    parser.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default: --results)")
    args = parser.parse_args(argv)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    made = 0
    for name, fn in PLOTS.items():
        src = args.results / f"{name}.json"
        if not src.exists():
            print(f"{src}: missing, no {name}.png (run bench/{name}.py)", file=sys.stderr)
            continue
        doc = json.loads(src.read_text())
        try:
            path = fn(doc, out)
        except (KeyError, TypeError, ValueError) as exc:
            print(f"{src}: cannot plot ({type(exc).__name__}: {exc}); re-run bench/{name}.py", file=sys.stderr)
            continue
        print(f"wrote {path}")
        made += 1
    summary = write_summary(args.results, out)
    if summary:
        print(f"wrote {summary}")
    return 0 if made else 1


if __name__ == "__main__":
    sys.exit(main())
