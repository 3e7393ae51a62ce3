"""Regenerate the summary table of ``benchmarks/README.md`` from the ``peftfast bench`` JSON files of a results folder.

    python benchmarks/summarize.py benchmarks/results/<date>-<device> [--readme benchmarks/README.md]

Every ``bench.json`` below the folder becomes one row per method (the reference row first): tokens/s and its ratio
to the reference, peak memory and its ratio, saved activations, the loss agreement, with the device, versions and
commit that the JSON records. The table replaces what stands between the two marker lines of the README (they are
appended, with the table, when missing), so the summary never drifts from the measured files.
"""

from __future__ import annotations

import argparse
import json
import os

START = "<!-- bench-summary:start (benchmarks/summarize.py writes this table from the JSON; do not edit) -->"
END = "<!-- bench-summary:end -->"


def _runs(results_dir: str) -> list[tuple[str, dict]]:
    runs = []
    for root, _, files in sorted(os.walk(results_dir)):
        if "bench.json" in files:
            with open(os.path.join(root, "bench.json")) as f:
                runs.append((os.path.relpath(root, results_dir), json.load(f)))
    return runs


def _x(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def _num(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def render(results_dir: str) -> str:
    """The Markdown table (and its provenance lines) of every run under ``results_dir``."""
    runs = _runs(results_dir)
    if not runs:
        raise SystemExit(f"summarize: no bench.json under {results_dir}")
    lines = [f"Runs under `{results_dir}` (regenerated from their `bench.json`):", "",
             "| run | model, method | tokens/step | method | tokens/s | vs ref | peak MB | vs ref | saved MB | "
             "max rel Δloss |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    provenance = set()
    for name, res in runs:
        cfg = res["config"]
        what = f"{res['model']}, {cfg['method']} r={cfg['rank']} {cfg['dtype']}" + _layout(cfg)
        ref = res["results"][0]
        for r in res["results"]:
            lines.append(f"| {name} | {what} | {res['batch_size']}x{res['seq_len']} | {r['method']} | "
                         f"{r['tokens_per_s']:.0f} | {_x(r['tokens_per_s'], ref['tokens_per_s'])} | "
                         f"{_num(r['peak_mb'], '.0f')} | {_x(r['peak_mb'], ref['peak_mb'])} | "
                         f"{_num(r['saved_mb'], '.1f')} | {r['max_rel_loss_diff_vs_peft']:.1e} |")
        for skipped, why in res.get("skipped", {}).items():
            lines.append(f"| {name} | {what} | | {skipped}: skipped ({why}) | | | | | | |")
        v = res["versions"]
        provenance.add(f"{res['device']}; torch {v.get('torch')}, triton {v.get('triton')}, transformers "
                       f"{v.get('transformers')}, peft {v.get('peft')}; commit {res['commit']}")
    lines += _packing_lines(runs)
    lines += [""] + [f"- {p}" for p in sorted(provenance)]
    return "\n".join(lines)


def _layout(cfg: dict) -> str:
    return ", packed" if cfg.get("packed") else ", padded" if cfg.get("padded") else ""


def _packing_lines(runs: list[tuple[str, dict]]) -> list[str]:
    """Packed vs padded tokens/s per method, for each pair of runs of the same model, method and shape (the same
    document lengths, laid out packed or one per row and padded)."""
    def shape(res: dict) -> tuple:
        c = res["config"]
        return res["model"], res["layers"], res["seq_len"], c["method"], c["rank"], c["dtype"], c["dropout"]

    padded = {shape(res): res for _, res in runs if res["config"].get("padded")}
    out = []
    for name, res in runs:
        other = padded.get(shape(res)) if res["config"].get("packed") else None
        if other is None:
            continue
        tps = {r["method"]: r["tokens_per_s"] for r in other["results"]}
        ratios = [f"{r['method']} {r['tokens_per_s'] / tps[r['method']]:.2f}x" for r in res["results"]
                  if tps.get(r["method"])]
        out.append(f"- packed / padded tokens/s ({name}): " + ", ".join(ratios))
    return [""] + out if out else []


def update_readme(readme: str, table: str) -> None:
    """Put ``table`` between the markers of ``readme`` (appending a section with the markers when absent)."""
    text = open(readme).read() if os.path.exists(readme) else ""
    block = f"{START}\n{table}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## Latest `peftfast bench` runs\n\n{block}\n"
    with open(readme, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results_dir")
    ap.add_argument("--readme", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"))
    args = ap.parse_args(argv)
    table = render(args.results_dir)
    update_readme(args.readme, table)
    print(table)
    print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
