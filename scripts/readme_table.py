"""The README's performance table from ``benchmarks/onnx_runtime.py`` JSON: per model and batch,
the library's images/s and its speed over PyTorch eager and over ONNX Runtime, both from the
same run.

    python scripts/readme_table.py run.json [more.json ...] > table.md
    python scripts/readme_table.py --compact run.json   # the README's: a column per model

Several files (one process per model, say) make one table, in the order given. A run must
have timed the sides ``jax_folded``, ``torch_eager`` and ``torch`` (ONNX Runtime on
``torch.onnx.export``); with ``--peak-gflops`` the table has the library's share of the FMA peak.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

NEEDED = ("library_images_per_s", "library_vs_torch_eager", "library_vs_ort")


def rows(record: dict[str, Any], source: str = "") -> list[dict[str, Any]]:
    """One row per case; a case without the library, torch eager or ONNX Runtime on torch's
    export is an error (the run's ``--sides`` left one out)."""
    out = []
    for case in record["cases"]:
        summary = case.get("summary", {})
        missing = [key for key in NEEDED if key not in summary]
        if missing:
            raise ValueError(f"{source}: {case['model']} batch {case['batch']} has no "
                             f"{', '.join(missing)}: run benchmarks/onnx_runtime.py with "
                             "--sides jax_folded,torch_eager,torch")
        out.append({"model": case["model"], "batch": case["batch"],
                    "images_per_s": summary["library_images_per_s"],
                    "vs_torch_eager": summary["library_vs_torch_eager"],
                    "vs_ort": summary["library_vs_ort"],
                    "peak_fraction": summary.get("peak_fraction", {}).get("jax_folded")})
    return out


def caption(records: list[dict[str, Any]]) -> str:
    """The conditions under the table: versions, threads, repeats, size, dates, command."""
    first = records[0]
    args, machine = first["args"], first["machine"]
    dates = sorted({r.get("date", "?") for r in records})
    sizes = sorted({c["size"] for r in records for c in r["cases"]})
    repeats = sorted({r["args"]["repeats"] for r in records})
    return (f"Library (`optimize_for_inference`) images/s and its speed over PyTorch eager "
            f"{machine['torch']} (the faster of NCHW and channels_last) and over ONNX Runtime "
            f"{machine['onnxruntime']} (CPU execution provider, `torch.onnx.export`, its fastest "
            f"of the graph optimization levels {', '.join(args['opt_levels'])}); one process, "
            f"interleaved, medians of {'/'.join(map(str, repeats))}, fp32, "
            f"{'/'.join(f'{s}x{s}' for s in sizes)}, {args['threads']} threads, "
            f"{machine['cpu_count']} CPUs, {', '.join(dates)} "
            f"(`benchmarks/onnx_runtime.py`; `scripts/readme_table.py`):")


def table(records: list[dict[str, Any]], sources: list[str] | None = None) -> str:
    """The caption and the markdown table of every case in ``records``."""
    sources = sources or [""] * len(records)
    all_rows = [row for record, source in zip(records, sources, strict=True)
                for row in rows(record, source)]
    peak = all(row["peak_fraction"] is not None for row in all_rows)
    head = ["model", "batch", "library img/s", "vs PyTorch eager", "vs ONNX Runtime"]
    head += ["of FMA peak"] if peak else []
    lines = [caption(records), "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for row in all_rows:
        cells = [row["model"], str(row["batch"]), f"{row['images_per_s']:.1f}",
                 f"{row['vs_torch_eager']:.2f}", f"{row['vs_ort']:.2f}"]
        cells += [f"{row['peak_fraction']:.0%}"] if peak else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The README's short column names, in its order.
SHORT = {"resnet18": "r18", "resnet34": "r34", "resnet50": "r50", "resnet101": "r101",
         "resnet152": "r152", "resnext50_32x4d": "rx50 32x4d", "resnext101_32x8d": "rx101 32x8d",
         "resnext101_64x4d": "rx101 64x4d", "wide_resnet50_2": "wrn50",
         "wide_resnet101_2": "wrn101"}


def compact_table(records: list[dict[str, Any]], sources: list[str] | None = None) -> str:
    """The caption and a table with a column per model and, per batch, a row of the speed over
    PyTorch eager and one over ONNX Runtime."""
    sources = sources or [""] * len(records)
    by_case = {(row["model"], row["batch"]): row
               for record, source in zip(records, sources, strict=True)
               for row in rows(record, source)}
    models = list(dict.fromkeys(model for model, _ in by_case))
    batches = sorted({batch for _, batch in by_case})
    head = ["batch", "over"] + [SHORT.get(model, model) for model in models]
    lines = [caption(records), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for batch in batches:
        for key, name in (("vs_torch_eager", "PyTorch eager"), ("vs_ort", "ONNX Runtime")):
            cells = [f"{by_case[(m, batch)][key]:.2f}" if (m, batch) in by_case else "-"
                     for m in models]
            lines.append("| " + " | ".join([str(batch), name, *cells]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="benchmarks/onnx_runtime.py --json output(s)")
    p.add_argument("--compact", action="store_true",
                   help="a column per model, rows of ratios per batch (the README's layout)")
    args = p.parse_args(argv)
    try:
        records = [json.loads(pathlib.Path(path).read_text()) for path in args.json]
        text = (compact_table if args.compact else table)(records, args.json)
    except (OSError, ValueError, KeyError) as err:
        # KeyError: a JSON file from another script (or an older onnx_runtime.py)
        p.error(f"{type(err).__name__}: {err}")
    print(text)
    return text


if __name__ == "__main__":
    main()
