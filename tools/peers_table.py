"""Joins `wattn bench --json` and the CubeK peer's JSON into one table (markdown) and one JSON.

python3 tools/peers_table.py WATTN.json CUBEK.json OUT.json
"""
import json
import sys


def key(p):
    return (p["dtype"], p["head_dim"], p["causal"], p["seq"])


def main(wattn_path, cubek_path, out_path):
    wattn = json.load(open(wattn_path))
    cubek = json.load(open(cubek_path))
    theirs = {key(p): p for p in cubek["points"]}
    peak = wattn.get("peak") or {}

    rows = []
    for p in wattn["points"]:
        other = theirs.get(key(p), {})
        ours_s, theirs_s = p.get("flash_median_s"), other.get("median_s")
        ratio = theirs_s / ours_s if ours_s and theirs_s else None
        rows.append({
            "series": p["series"], "seq": p["seq"], "batch": p["batch"], "heads": p["heads"],
            "wattn_s": ours_s, "cubek_s": theirs_s, "cubek_over_wattn": ratio,
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
    print("| shape | seq | wattn ms | CubeK ms | wattn faster by | wattn % of FMA peak | CubeK % of FMA peak |")
    print("|---|---|---|---|---|---|---|")
    ms = lambda s: f"{s * 1e3:.1f}" if s else "-"
    pct = lambda f: f"{100 * f:.1f} %" if f else "-"
    for r in rows:
        ratio = f"{r['cubek_over_wattn']:.2f}x" if r["cubek_over_wattn"] else "-"
        print(f"| {r['series']} | {r['seq']} | {ms(r['wattn_s'])} | {ms(r['cubek_s'])} | {ratio} | "
              f"{pct(r['wattn_fraction_of_peak'])} | {pct(r['cubek_fraction_of_peak'])} |")
    ratios = sorted(r["cubek_over_wattn"] for r in rows if r["cubek_over_wattn"])
    if ratios:
        print(f"\nmedian wattn/CubeK speed ratio: {ratios[len(ratios) // 2]:.2f}x over {len(ratios)} points")
    json.dump({"adapter": wattn["adapter"], "date": wattn["date"], "peak": peak, "wattn_config": wattn["flash_config"],
               "cubek": cubek["kernel"], "points": rows}, open(out_path, "w"), indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:4])
