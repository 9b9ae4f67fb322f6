"""The markdown page of one `tools/gpu-bench.sh run`: peak, tuning, prefill and decode tables
from the JSON it wrote, with the issue's targets checked where the figures allow.

python3 tools/gpu_bench_md.py DIR [OUT]

OUT is a file, or a directory to write bench-<adapter>.md into (default: DIR). Files of steps
that failed or timed out are missing; their sections say so.
"""
import json
import os
import re
import sys


def load(dir, name):
    path = os.path.join(dir, name)
    return json.load(open(path)) if os.path.exists(path) else None


def slug(adapter_name):
    """"llvmpipe (LLVM 15.0.6, 256 bits)" -> "llvmpipe", "NVIDIA H200" -> "nvidia-h200"."""
    name = re.sub(r"\(.*?\)", "", adapter_name)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "adapter"


def sig3(x):
    return "-" if x is None else f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def ms(seconds):
    return "-" if seconds is None else sig3(seconds * 1e3)


def pct(fraction):
    return "-" if fraction is None else f"{100 * fraction:.1f} %"


def flop_unit(rates):
    """TFLOP/s, or GFLOP/s where every rate is below 1 TFLOP/s (software adapters)."""
    return ("TFLOP/s", 1e12) if max([r for r in rates if r] or [0]) >= 1e12 else ("GFLOP/s", 1e9)


def rate(value, unit):
    return "-" if value is None else sig3(value / unit[1])


def tokens(n):
    """1024 -> "1K", 1000 -> "1000"."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def outcome(point):
    """The reason a point has no figures, or None when it was measured."""
    if point.get("status") == "measured":
        return None
    return f"{point.get('status')}: {point.get('reason') or ''}".strip()


def steps_section(dir):
    path = os.path.join(dir, "steps.txt")
    lines = open(path).read().split("\n") if os.path.exists(path) else []
    return "## Steps\n\n" + "".join(f"- {line}\n" for line in lines if line) + "\n"


def peak_section(peak):
    if not peak:
        return "## Peak\n\nNo figures (the peak step did not finish).\n\n", None
    p = peak["peak"]
    unit = flop_unit([p["fma_f32"]["rate"]])
    rows = [["f32 FMA", f"{rate(p['fma_f32']['rate'], unit)} {unit[0]}"]]
    if p.get("fma_f16"):
        rows.append(["f16 FMA", f"{rate(p['fma_f16']['rate'], unit)} {unit[0]}"])
    rows.append(["copy", f"{sig3(p['copy']['rate'] / 1e9)} GB/s"])
    text = f"## Peak (`wattn peak`, median of {peak['runs']})\n\n" + table(["ceiling", "rate"], rows) + "\n"
    return text, p


def tune_section(dir, info_tuned):
    text = "## Tuning (`wattn tune`)\n\n"
    rows, details, preset_name, shapes = [], "", "preset", []
    reports = [(name, load(dir, name)) for name in ["tune-d64.json", "tune-d128.json"]]
    for name, report in reports:
        if not report:
            text += f"No {name} (the step did not finish).\n\n"
    reports = [report for _, report in reports if report]
    unit = flop_unit([c["flops_per_s"] for report in reports for r in report["results"] for c in r["candidates"]])
    for report in reports:
        text_shape = f"seq {tokens(report['seq'])}, batch 1, {report['heads']} heads, median of {report['runs']} runs"
        shapes += [text_shape] if text_shape not in shapes else []
        for r in report["results"]:
            by_config = {c["config"]: c for c in r["candidates"]}
            best = by_config.get(r["winner"]) if r["winner"] else None
            preset = by_config.get(report["preset"])
            speedup = preset["median_s"] / best["median_s"] if best and preset and preset.get("median_s") else None
            passed = sum(1 for c in r["candidates"] if c["accurate"])
            rows.append([r["bucket"], r["winner"] or "none", ms(best and best["median_s"]),
                         rate(best and best["flops_per_s"], unit), ms(preset and preset.get("median_s")),
                         f"{sig3(speedup)}x" if speedup else "-", f"{passed}/{len(r['candidates'])}"])
            cand_rows = [[c["config"], ms(c["median_s"]), rate(c["flops_per_s"], unit),
                          "ok" if c["accurate"] else c["failure"] or "fail",
                          f"{c['out_error']:.1e} / {c['out_bound']:.1e}" if c["out_error"] is not None else "-"]
                         for c in r["candidates"]]
            details += f"{r['bucket']} ({text_shape}):\n\n" + table(
                ["config", "ms", unit[0], "accuracy", "O error / bound"], cand_rows) + "\n"
        preset_name = report["preset_source"]
    if rows:
        text += f"Candidates timed at {'; '.join(shapes)}, each checked against the f64 reference first.\n\n"
        text += table(["bucket", "winner", "ms", unit[0], f"{preset_name} ms", "speed-up", "passed"], rows)
        text += "\n<details><summary>every candidate</summary>\n\n" + details + "</details>\n\n"
    if info_tuned and "flash config per shape" in info_tuned:
        per_shape = info_tuned.split("flash config per shape")[-1].split("\n")[1:]
        text += "`wattn info` afterwards:\n\n```text\n" + "\n".join(l.strip() for l in per_shape if l.strip()) + "\n```\n\n"
    return text


def prefill_section(dir, peak):
    text = "## Prefill (`wattn bench`, d128)\n\n"
    rows, best_f16 = [], None
    f32_peak = peak["fma_f32"]["rate"] if peak else None
    reports = {dtype: load(dir, f"prefill-{dtype}.json") for dtype in ["f16", "f32"]}
    unit = flop_unit([p.get("flash_flops_per_s") for r in reports.values() if r for p in r["points"]])
    for dtype, report in reports.items():
        if not report:
            text += f"No prefill-{dtype}.json (the step did not finish).\n\n"
            continue
        for p in report["points"]:
            why = outcome(p)
            source = "tuned" if (p.get("config_source") or "").startswith("tuned") else p.get("config_source") or ""
            flops = p.get("flash_flops_per_s")
            if dtype == "f16" and flops and (best_f16 is None or flops > best_f16[0]):
                best_f16 = (flops, p["series"], p["seq"])
            rows.append([p["series"], tokens(p["seq"]), f"{p['batch']} x {p['heads']}", f"{p['config']} ({source})"]
                        + ([why, "", "", "", ""] if why else [
                            ms(p["flash_median_s"]), rate(flops, unit),
                            pct(flops / f32_peak if flops and f32_peak else None),
                            ms(p.get("naive_median_s")), f"{sig3(p['speedup'])}x" if p.get("speedup") else "-"]))
    if rows:
        text += table(["series", "seq", "batch x heads", "config", "flash ms", unit[0], "of f32 FMA peak",
                       "naive ms", "speed-up"], rows) + "\n"
    if best_f16:
        flops, series, seq = best_f16
        verdict = "met" if flops >= 25e12 else "not met"
        text += (f"Target prefill D = 128 f16 >= 25 TFLOP/s: best {rate(flops, ('TFLOP/s', 1e12))} TFLOP/s "
                 f"({series}, seq {tokens(seq)}): {verdict}.\n\n")
    return text


def decode_section(dir, peak):
    report = load(dir, "decode.json")
    text = "## Decode (`wattn bench --decode`)\n\n"
    if not report:
        return text + "No decode.json (the step did not finish).\n\n"
    copy = peak["copy"]["rate"] if peak else None
    rows, speedups, rates = [], {}, {}
    for p in report["points"]:
        why = outcome(p)
        bandwidth = p.get("bytes_per_s")
        if not why:
            key = (p["series"], p["cache_len"])
            speedups[key] = max(speedups.get(key, 0.0), p.get("speedup_vs_unsplit") or 0.0)
            rates[key] = max(rates.get(key, 0.0), bandwidth or 0.0)
        rows.append([p["series"], tokens(p["cache_len"]), p["setting"]]
                    + ([why, "", "", ""] if why else [
                        ms(p["median_s"]), sig3(bandwidth / 1e9) if bandwidth else "-",
                        pct(bandwidth / copy if bandwidth and copy else None),
                        "same plan as " + p["same_plan_as"] if p.get("same_plan_as") else f"{sig3(p['speedup_vs_unsplit'])}x"])
                    )
    text += table(["series", "cache", "splits", "ms", "GB/s", "of copy peak", "vs 1 split"], rows) + "\n"
    at_32k = [(bandwidth, series) for (series, cache), bandwidth in rates.items() if cache == 32768 and bandwidth]
    if at_32k and copy:
        bandwidth, series = max(at_32k)
        verdict = "met" if bandwidth >= 0.7 * copy else "not met"
        text += f"Target decode at 32K >= 70 % of copy bandwidth: best {pct(bandwidth / copy)} ({series}): {verdict}.\n\n"
    from_8k = [(speedup, series, cache) for (series, cache), speedup in speedups.items() if cache >= 8192]
    if from_8k:
        beaten = sum(1 for s, _, _ in from_8k if s > 1.0)
        text += f"Target split-KV beats unsplit from 8K keys: {beaten} of {len(from_8k)} (series, cache) points.\n\n"
    return text


def main(dir, out=None):
    peak_json = load(dir, "peak.json")
    any_report = peak_json or next((load(dir, n) for n in ["prefill-f16.json", "decode.json", "tune-d64.json"]
                                    if load(dir, n)), None)
    if not any_report:
        sys.exit(f"gpu_bench_md: no report in {dir}")
    adapter = any_report["adapter"]
    info_tuned_path = os.path.join(dir, "info-tuned.txt")
    info_tuned = open(info_tuned_path).read() if os.path.exists(info_tuned_path) else None
    peak_text, peak = peak_section(peak_json)
    page = (f"# wattn on {adapter['name']}\n\n"
            f"{adapter['name']} ({adapter['backend']}, {adapter['device_type']}, {adapter['driver']} "
            f"{adapter['driver_info']}), measured {any_report['date']} by wattn {any_report['wattn_version']} "
            f"(`tools/gpu-bench.sh run`), timed by {any_report['clock'].replace('_', ' ')}. Every flash output "
            "was checked before it was timed.\n\n"
            + steps_section(dir) + peak_text + tune_section(dir, info_tuned)
            + prefill_section(dir, peak) + decode_section(dir, peak))
    out = out or dir
    path = os.path.join(out, f"bench-{slug(adapter['name'])}.md") if os.path.isdir(out) else out
    with open(path, "w") as f:
        f.write(page)
    print(f"gpu_bench_md: wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(*sys.argv[1:3])
