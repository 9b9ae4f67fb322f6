"""Joins `wattn bench --json` and the CubeK peer's JSON into one table (markdown), one JSON and
one plot (SVG: wattn, CubeK and wattn's naive baseline over the sequence length, a panel per
series, log-scale time).

python3 tools/peers_table.py WATTN.json CUBEK.json OUT.json [OUT.svg]
"""
import json
import math
import sys


def key(p):
    return (p["dtype"], p["head_dim"], p["causal"], p["seq"])


def main(wattn_path, cubek_path, out_path, svg_path=None):
    wattn = json.load(open(wattn_path))
    cubek = json.load(open(cubek_path))
    theirs = {key(p): p for p in cubek["points"]}
    peak = wattn.get("peak") or {}

    rows = []
    for p in wattn["points"]:
        other = theirs.get(key(p), {})
        ours_s, theirs_s = p.get("flash_median_s"), other.get("median_s")
        ratio = theirs_s / ours_s if ours_s and theirs_s else None
        naive_s = p.get("naive_median_s")
        rows.append({
            "series": p["series"], "seq": p["seq"], "batch": p["batch"], "heads": p["heads"],
            "wattn_s": ours_s, "cubek_s": theirs_s, "cubek_over_wattn": ratio, "naive_s": naive_s,
            "naive_over_wattn": naive_s / ours_s if naive_s and ours_s else None,
            "wattn_fraction_of_peak": p.get("fraction_of_peak"),
            "wattn_flops_per_s": p.get("flash_flops_per_s"),
            "cubek_flops_per_s": p["flops"] / theirs_s if theirs_s else None,
            # Against the same measured peak as wattn's own figure (f32 FMA: both compute in f32).
            "cubek_fraction_of_peak": p["fraction_of_peak"] * ours_s / theirs_s if ratio and p.get("fraction_of_peak") else None,
        })
    adapter = wattn["adapter"]
    config = ",".join(str(v) for v in wattn["flash_config"].values())
    print(f"adapter: {adapter['name']} ({adapter['driver_info']}, {adapter['backend']}), {wattn['date']}")
    print(f"wattn {wattn['wattn_version']} flash config {config}; CubeK: {cubek['kernel']}; wall clock, median")
    print()
    print("| shape | seq | wattn ms | CubeK ms | wattn faster by | naive ms | vs naive | wattn % of FMA peak "
          "| CubeK % of FMA peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    ms = lambda s: f"{s * 1e3:.1f}" if s else "-"
    pct = lambda f: f"{100 * f:.1f} %" if f else "-"
    times = lambda x: f"{x:.2f}x" if x else "-"
    for r in rows:
        print(f"| {r['series']} | {r['seq']} | {ms(r['wattn_s'])} | {ms(r['cubek_s'])} | {times(r['cubek_over_wattn'])} | "
              f"{ms(r['naive_s'])} | {times(r['naive_over_wattn'])} | {pct(r['wattn_fraction_of_peak'])} | "
              f"{pct(r['cubek_fraction_of_peak'])} |")
    ratios = sorted(r["cubek_over_wattn"] for r in rows if r["cubek_over_wattn"])
    if ratios:
        middle = ratios[(len(ratios) - 1) // 2 : len(ratios) // 2 + 1]
        print(f"\nmedian wattn/CubeK speed ratio: {sum(middle) / len(middle):.2f}x over {len(ratios)} points")
    json.dump({"adapter": wattn["adapter"], "date": wattn["date"], "peak": peak, "wattn_config": wattn["flash_config"],
               "cubek": cubek["kernel"], "points": rows}, open(out_path, "w"), indent=2)
    if svg_path:
        open(svg_path, "w").write(plot(rows, f"{adapter['name']}, {wattn['date'][:10]}"))


PATHS = [("wattn", "wattn_s", "#1f77b4"), ("CubeK", "cubek_s", "#d62728"), ("naive", "naive_s", "#7f7f7f")]


def plot(rows, title):
    """Small multiples: a panel per series, time (log) over the sequence length (log), a line per path."""
    series = list(dict.fromkeys(r["series"] for r in rows))
    w, h, pad, cols = 300, 220, 48, min(4, len(series))
    panels_down = math.ceil(len(series) / cols)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{cols * w}" height="{panels_down * h + 40}" '
           f'font-family="sans-serif" font-size="11">',
           f'<text x="8" y="16" font-size="13">{title}: wall ms over N (both axes log)</text>']
    for i, (name, _, colour) in enumerate(PATHS):
        out.append(f'<text x="{8 + 70 * i}" y="32" fill="{colour}">&#9632; {name}</text>')
    for n, s in enumerate(series):
        x0, y0 = (n % cols) * w, 40 + (n // cols) * h
        mine = [r for r in rows if r["series"] == s]
        seqs = sorted({r["seq"] for r in mine})
        values = [r[k] for r in mine for _, k, _ in PATHS if r[k]]
        if not values:
            continue
        lo, hi = math.log10(min(values)), math.log10(max(values))
        hi = hi if hi > lo else lo + 1
        sx = lambda q: x0 + pad + (w - 1.5 * pad) * (math.log2(q / seqs[0]) / max(1, math.log2(seqs[-1] / seqs[0])))
        sy = lambda t: y0 + h - pad + -(h - 1.5 * pad) * (math.log10(t) - lo) / (hi - lo)
        out.append(f'<text x="{x0 + pad}" y="{y0 + 14}">{s}</text>')
        out.append(f'<rect x="{x0 + pad}" y="{y0 + pad / 2}" width="{w - 1.5 * pad}" height="{h - 1.5 * pad}" '
                   f'fill="none" stroke="#ccc"/>')
        for q in seqs:
            out.append(f'<text x="{sx(q) - 10:.1f}" y="{y0 + h - pad + 14}">{q}</text>')
        for t in (10 ** lo, 10 ** hi):
            label = f"{t * 1e3:.0f}" if t >= 0.1 else f"{t * 1e3:.3g}"
            out.append(f'<text x="{x0 + 2}" y="{sy(t) + 4:.1f}">{label}</text>')
        for _, k, colour in PATHS:
            pts = [(sx(r["seq"]), sy(r[k])) for r in sorted(mine, key=lambda r: r["seq"]) if r[k]]
            if pts:
                path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
                out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
                out.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in pts)
    out.append("</svg>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main(*sys.argv[1:5])
