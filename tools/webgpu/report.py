#!/usr/bin/env python3
"""Summarises the WebGPU check: pass counts per kernel family and stage, the first errors.

Usage: report.py MANIFEST RESULTS_JSON...

Each RESULTS_JSON is what the page (check.js) or Dawn for Node (node-check.mjs) wrote.
Exits 1 if any check failed, a runner stopped early, or a variant was validated by no
runner; 0 otherwise. The last line reads "webgpu: N passed, M failed".
"""

import json
import re
import sys

STAGES = ["validate", "pipeline", "run"]
RUNNERS = {"chromium": "Chromium", "dawn-node": "Dawn/Node"}
FIRST_ERRORS = 8


def runner_name(runner):
    return RUNNERS.get(runner, runner)


def adapter_text(results):
    a = results.get("adapter") or {}
    name = " ".join(x for x in [a.get("vendor"), a.get("architecture"), a.get("description")] if x)
    if results["runner"] == "chromium":
        return f"{results.get('browser') or '?'}, adapter {name or '?'}"
    return f"Dawn for Node, {name or '?'}"


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        variants = json.load(f)["variants"]
    reports = []
    for path in argv[1:]:
        with open(path) as f:
            reports.append(json.load(f))

    families = list(dict.fromkeys(v["kernel"] for v in variants))
    columns = [(r["runner"], s) for r in reports for s in STAGES if any(c["stage"] == s for c in r["checks"])]
    counts = {}  # (runner, stage, kernel) -> [passed, failed]
    failures = []
    for r in reports:
        for c in r["checks"]:
            n = counts.setdefault((r["runner"], c["stage"], c["kernel"]), [0, 0])
            n[0 if c["ok"] else 1] += 1
            if not c["ok"]:
                failures.append((r["runner"], c))

    for r in reports:
        print(f"{runner_name(r['runner'])}: {adapter_text(r)}, {r.get('seconds', 0):.0f} s")
    header = ["kernel"] + [f"{s} ({runner_name(runner)})" for runner, s in columns]
    rows = [header]
    for kernel in families:
        row = [kernel]
        for runner, stage in columns:
            passed, failed = counts.get((runner, stage, kernel), [0, 0])
            row.append(f"{passed}/{passed + failed}" if passed + failed else "-")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))

    for r in reports:
        skipped = {}
        for s in r["skipped"]:
            why = "limits" if s["why"].startswith("needs ") else s["why"]
            skipped[(s["stage"], why)] = skipped.get((s["stage"], why), 0) + 1
        for (stage, why), n in sorted(skipped.items()):
            print(f"  {runner_name(r['runner'])} skipped {n} {stage}: {why}")

    problems = []
    for r in reports:
        if r.get("fatal"):
            problems.append(f"{runner_name(r['runner'])} stopped early: {r['fatal']}")
    validated = {c["name"] for r in reports for c in r["checks"] if c["stage"] == "validate"}
    unchecked = [v["label"] for v in variants if v["label"] not in validated]
    if unchecked:
        problems.append(f"{len(unchecked)} variants were validated by no runner, e.g. {unchecked[0]}")

    if failures:
        # One line per distinct error (line numbers aside: the prelude's length varies).
        distinct = {}
        for runner, c in failures:
            error = re.sub(r"^\d+:\d+ ", "", c.get("error") or "?")
            distinct.setdefault((runner, c["stage"], c["kernel"], error), []).append(c["name"])
        print(f"{len(failures)} failures, {len(distinct)} distinct; the first {min(FIRST_ERRORS, len(distinct))}:")
        for (runner, stage, kernel, error), names in list(distinct.items())[:FIRST_ERRORS]:
            if len(error) > 400:
                error = error[:400] + " ..."
            print(f"  [{runner_name(runner)} {stage}] {kernel}, {len(names)} like {names[0]}\n    {error}")
    for p in problems:
        print(f"error: {p}")
    passed = sum(n[0] for n in counts.values())
    failed = sum(n[1] for n in counts.values())
    print(f"webgpu: {passed} passed, {failed} failed")
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
