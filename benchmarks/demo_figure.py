"""The README's demo figure: the eval curves of a `make demo` run (its eval.summary metrics over steps, domain
and retention side by side) and its before/after table.

    python benchmarks/demo_figure.py RUN_DIR [--out docs/demo_curves.png]

Reads RUN_DIR/metrics.jsonl (the in-loop evaluations, ``eval/<metric>`` keys), RUN_DIR/.hydra/config.yaml (the
run's ``eval.summary``) and RUN_DIR/eval/summary.md (the table the run printed); trains nothing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def eval_curves(run_dir: Path, names: list[str]) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] from the run's metrics.jsonl, in step order."""
    out: dict[str, list[tuple[int, float]]] = {n: [] for n in names}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for n in names:
            if f"eval/{n}" in row:
                out[n].append((int(row["step"]), float(row[f"eval/{n}"])))
    return {n: sorted(v) for n, v in out.items()}


def plot(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"domain (synthetic/...)": [n for n in curves if n.startswith("synthetic/")],
              "retention (world/...)": [n for n in curves if n.startswith("world/")]}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, (name, metrics) in zip(axes, groups.items()):
        for m in metrics:
            steps, vals = zip(*curves[m]) if curves[m] else ((), ())
            ax.plot(steps, vals, marker="o", label=m.split("/", 1)[1])
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, list[tuple[int, float]]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "demo_curves.png")
    a = p.parse_args(argv)
    cfg = yaml.safe_load((a.run_dir / ".hydra" / "config.yaml").read_text())
    names = list(cfg["eval"]["summary"])
    if not names:
        raise SystemExit(f"{a.run_dir}: eval.summary is empty; run `python train.py experiment=demo`")
    curves = eval_curves(a.run_dir, names)
    plot(curves, a.out, f"make demo: the shipped base fine-tuned on the fashion catalog "
                        f"(lr {cfg['optim']['lr']}, {cfg['trainer']['max_steps']} steps)")
    print((a.run_dir / "eval" / "summary.md").read_text())  # noqa: T201 (the table for the README)
    return curves


if __name__ == "__main__":
    main()
