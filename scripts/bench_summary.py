#!/usr/bin/env python3
"""One table of every benchmark's figures against its target (Python standard library only).

Reads each target/rankstab-bench/*.json that `make bench` wrote (the directory can be
given as the first argument) and prints: benchmark, figure, value, target, met / NOT met.

* A file with a top-level "summary" list of {"name", "value", "target", "op" ("<=" or
  ">="), "met", "unit" (optional)} is printed row by row (theory_speed.json has one).
* train_step.json without such a list is read from its own fields (probe_overhead and its
  target; ratios_rankstab_over_transformers.step_time and peak_memory, target <= 1).
* The known benchmarks whose file is missing are listed as "not run".

Always exits 0: it reports, it does not judge.
"""
import json
import math
import os
import sys

KNOWN = ["theory_speed", "train_step"]


def fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        a = abs(v)
        s = f"{v:.0f}" if a >= 100 else f"{v:.2f}" if a >= 0.01 or a == 0 else f"{v:.3g}"
        return f"{s} {unit}".rstrip()
    return str(v)


def met_of(value, target, op, given=None):
    if isinstance(given, bool):
        return given
    if not isinstance(value, (int, float)) or not isinstance(target, (int, float)):
        return None
    if op == "<=":
        return value <= target
    if op == ">=":
        return value >= target
    return None


def verdict(met):
    return "met" if met is True else "NOT met" if met is False else "-"


def summary_rows(data):
    rows = []
    for r in data.get("summary") or []:
        if not isinstance(r, dict):
            continue
        value, target, op = r.get("value"), r.get("target"), r.get("op")
        unit = r.get("unit") or ""
        rows.append((
            str(r.get("name", "?")),
            fmt(value, unit),
            f"{op or ''} {fmt(target, unit)}".strip() if target is not None else "-",
            verdict(met_of(value, target, op, r.get("met"))),
        ))
    return rows


def train_step_rows(data):
    rows = []
    if "probe_overhead" in data:
        v = data.get("probe_overhead")
        t = data.get("probe_overhead_target")
        rows.append(("probe overhead (median step time, probes on / off - 1)", fmt(v),
                     f"<= {fmt(t)}" if t is not None else "-",
                     verdict(met_of(v, t, "<=", data.get("probe_overhead_target_met")))))
        if "probe_overhead_fastest_steps" in data:
            rows.append(("probe overhead, fastest steps (on / off - 1)", fmt(data["probe_overhead_fastest_steps"]), "-", "-"))
    ratios = data.get("ratios_rankstab_over_transformers")
    if isinstance(ratios, dict):
        for key, label in [("step_time", "step time, rankstab / transformers+peft"),
                           ("peak_memory", "peak memory, rankstab / transformers+peft")]:
            if key in ratios:
                v = ratios[key]
                rows.append((label, fmt(v), "<= 1.00",
                             verdict(met_of(v, 1.0, "<=", ratios.get(f"{key}_target_met")))))
        for key, label in [("step_time_fastest_steps", "step time ratio, fastest steps"),
                           ("step_time_probes_on", "step time ratio, probes on")]:
            if key in ratios:
                rows.append((label, fmt(ratios[key]), "-", "-"))
    elif "ratios_rankstab_over_transformers" in data:
        rows.append(("ratios to transformers+peft", "not measured", "-", "-"))
    return rows


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "target", "rankstab-bench")
    names = set(KNOWN)
    if os.path.isdir(out):
        names |= {f[:-5] for f in os.listdir(out) if f.endswith(".json")}
    table = []
    for name in sorted(names):
        path = os.path.join(out, name + ".json")
        if not os.path.exists(path):
            table.append((name, "(no results)", "-", "-", "not run"))
            continue
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            table.append((name, f"unreadable: {e}", "-", "-", "-"))
            continue
        if not isinstance(data, dict):
            table.append((name, "unexpected JSON (not an object)", "-", "-", "-"))
            continue
        rows = summary_rows(data)
        if not rows and name == "train_step":
            rows = train_step_rows(data)
        if not rows:
            rows = [("(no summary figures)", "-", "-", "-")]
        table += [(name,) + r for r in rows]
    head = ("benchmark", "figure", "value", "target", "met")
    widths = [max(len(str(r[i])) for r in table + [head]) for i in range(5)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    print(line(head))
    print(line(tuple("-" * w for w in widths)))
    for r in table:
        print(line(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
