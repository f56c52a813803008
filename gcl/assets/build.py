"""Rebuild the shipped base model (``gcl/assets/gcl-base-world``) from a world pretraining run.

    python -m gcl.assets.build                      # train experiment=pretrain_world, then ship it
    python -m gcl.assets.build --run-dir DIR --skip-train   # ship an existing pretrain_world run
    python -m gcl.assets.build --resume [OVERRIDES]         # continue an interrupted build, then ship it

Training runs ``python train.py experiment=pretrain_world hydra.run.dir=RUN_DIR`` in a subprocess and records
its wall time and the machine's load averages (``os.getloadavg``) before and after: on a shared machine they
explain the time. Shipping takes the run's latest checkpoint through ``gcl.export`` (a verified open_clip
folder with its model card), casts the weights to fp16 (the size limit: ``--max-mib``, git refuses big
files), loads the folder back with open_clip and compares every tensor with the fp16-cast source, writes
``manifest.json`` (sha256, size, command, times, load, the run's last world evaluation) and appends a
"Shipped base" section to the card; the folder is replaced in one rename.

The run is seeded; on the same machine and thread count a rebuild repeats it, on another CPU float rounding
may differ, so the sha256 identifies the shipped file rather than promising a bit-identical rebuild.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gcl.assets import BASE_DIR, BASE_MODEL_NAME, sha256

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
TRAIN_COMMAND = ["train.py", "experiment=pretrain_world"]
MAX_MIB = 8.0


def _first_start(run_dir: Path) -> str | None:
    """The time stamp of the run's first ``train.log`` line (the first launch, also after resumes)."""
    log_file = run_dir / "train.log"
    if not log_file.is_file():
        return None
    m = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", log_file.read_text())
    return m.group(1) if m else None


def _launches(run_dir: Path) -> list[dict[str, Any]]:
    """Each launch of the run, from the config history gcl.resume keeps (``.hydra/overrides.step_<N>.yaml``):
    the step it started at and its train.py command (the run dir left out)."""
    import yaml

    out = []
    for f in sorted((run_dir / ".hydra").glob("overrides.step_*.yaml")):
        args = [o for o in yaml.safe_load(f.read_text()) or [] if not o.startswith("hydra.run.dir=")]
        out.append({"from_step": int(f.stem.split("_")[-1]), "command": " ".join(["python train.py", *args])})
    return sorted(out, key=lambda x: x["from_step"])


def train(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Run the pretraining; return {"command", "wall_s", "load_before", "load_after"} (this launch's)."""
    if not (REPO / "train.py").is_file():
        raise FileNotFoundError(f"{REPO / 'train.py'} not found: rebuild the base from a gcl checkout (the recipe is "
                                "conf/experiment/pretrain_world.yaml), or ship an existing run with --skip-train")
    cmd = [sys.executable, *TRAIN_COMMAND, f"hydra.run.dir={run_dir}", *overrides]
    load_before = list(os.getloadavg())
    t0 = time.perf_counter()
    log.info("training: %s (load averages %s)", " ".join(cmd[1:]), load_before)
    subprocess.run(cmd, cwd=REPO, check=True)
    return {"command": "python " + " ".join([*TRAIN_COMMAND, *overrides]), "wall_s": round(time.perf_counter() - t0, 1),
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()]}


def _trainer_seconds(run_dir: Path) -> float | None:
    """The trainer's own time for its steps (evaluations included), from ``train.log``'s last "done" line."""
    log_file = run_dir / "train.log"
    if not log_file.is_file():
        return None
    found = re.findall(r"done: \d+ steps in ([0-9.]+)s", log_file.read_text())
    return float(found[-1]) if found else None


def _world_metrics(run_dir: Path, step: int | None) -> dict[str, float]:
    path = run_dir / "eval" / f"step_{step:06d}.json" if step is not None else None
    if path is None or not path.is_file():
        return {}
    return {k: round(float(v), 4) for k, v in json.loads(path.read_text()).items() if k.startswith("world/")}


def _to_fp16(folder: Path) -> dict[str, torch.Tensor]:
    """Rewrite ``open_clip_model.safetensors`` with floating tensors in fp16; return the written tensors."""
    from safetensors.torch import load_file, save_file

    from gcl.export import WEIGHTS_NAME

    sd = load_file(str(folder / WEIGHTS_NAME))
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sorted(sd.items())}
    save_file(half, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    os.chmod(folder / WEIGHTS_NAME, 0o644)
    return half


def _verify(folder: Path, half: dict[str, torch.Tensor]) -> None:
    """open_clip loads the folder; every tensor equals the fp16 source (exactly: fp16 -> fp32 is exact)."""
    import open_clip

    model = open_clip.create_model(f"local-dir:{folder}")
    loaded = model.state_dict()
    bad = [k for k, v in half.items() if not torch.equal(loaded[k].to(v.dtype).reshape(v.shape), v)]
    if bad or set(loaded) - set(half):
        raise RuntimeError(f"open_clip's load of {folder} differs from the fp16 weights: {bad[:5]} "
                           f"{sorted(set(loaded) - set(half))[:5]}")


def ship(run_dir: Path, out: Path, *, training: dict[str, Any] | None, max_mib: float = MAX_MIB) -> dict[str, Any]:
    """Ship ``run_dir``'s latest checkpoint as the base folder ``out``; return the manifest."""
    from gcl.export import WEIGHTS_NAME, export_model, load_training_checkpoint

    src = load_training_checkpoint(run_dir)
    if src.name != BASE_MODEL_NAME:
        raise ValueError(f"{run_dir} trained {src.name!r}, not {BASE_MODEL_NAME!r}: ship a pretrain_world run")
    tmp = out.with_name(f".{out.name}.build-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        export_model(run_dir, tmp)
        half = _to_fp16(tmp)
        size = (tmp / WEIGHTS_NAME).stat().st_size
        if size > max_mib * 2**20:
            raise ValueError(f"fp16 weights are {size / 2**20:.2f} MiB, over the {max_mib} MiB limit: choose a "
                             "smaller architecture (gcl/model_configs/gcl-base.json)")
        _verify(tmp, half)
        manifest = {
            "model": BASE_MODEL_NAME, "weights": WEIGHTS_NAME, "dtype": "float16",
            "sha256": sha256(tmp / WEIGHTS_NAME), "bytes": size,
            "params": int(sum(v.numel() for v in half.values())), "step": src.step,
            "rebuild": "python -m gcl.assets.build",
            "training": {**(training or {}), "trainer_s": _trainer_seconds(run_dir), "launches": _launches(run_dir)},
            "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                        "processor": platform.processor() or platform.machine()},
            "world_eval": _world_metrics(run_dir, src.step),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        card = (tmp / "README.md").read_text()
        # the export's card describes a fine-tune; this model was trained from scratch
        card = card.replace(f"# gcl fine-tune of {BASE_MODEL_NAME}", "# gcl-base-world", 1).replace(
            "An OpenCLIP model fine-tuned with **gcl**", "An OpenCLIP model trained from scratch with **gcl**", 1)
        (tmp / "README.md").write_text(card + card_section(manifest))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def card_section(m: dict[str, Any]) -> str:
    t = m["training"]
    lines = ["", "## Shipped base (gcl/assets/gcl-base-world)", "",
             "The base model every gcl demo and study fine-tunes, as users fine-tune laion2b / webli weights. "
             "It was pretrained from scratch on the general synthetic world (`gcl.data.world`), not on fashion.", "",
             f"- Rebuild: `{m['rebuild']}` (runs `{t.get('command', 'python train.py experiment=pretrain_world')}`, "
             "then ships the run)",
             f"- Weights: `{m['weights']}`, {m['dtype']}, {m['bytes']} bytes, {m['params']} parameters",
             f"- sha256: `{m['sha256']}`",
             f"- Steps: {m['step']}",
             ]
    if t.get("resumed"):
        lines.append(f"- Trained in {len(t['launches'])} launches, each resuming the last one's checkpoint with "
                     f"`trainer.resume=auto` (settings changed at a resume apply from that step, as gcl.resume "
                     f"logs them): first launch {t['first_start']}, finished {t['finished']} (UTC); the times below "
                     "are the last launch's. The launches:")
        lines += [f"  - from step {x['from_step']}: `{x['command']}`" for x in t["launches"]]
    if "wall_s" in t:
        lines.append(f"- Training command wall time: {t['wall_s']:.0f} s (the trainer's steps and evaluations: "
                     f"{t['trainer_s']:.0f} s) on {m['machine']['cpus']} CPUs")
        lines.append(f"- Machine load averages (1, 5, 15 min) before: {t['load_before']}, after: {t['load_after']} "
                     "(the machine was shared with other jobs when the load exceeds its CPU count)")
    if m["world_eval"]:
        lines += ["", "World retention suite (`eval=world`) at the last step:", "", "| metric | value |", "|---|---|",
                  *[f"| {k} | {v:.4f} |" for k, v in sorted(m["world_eval"].items())]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m gcl.assets.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=REPO / "outputs" / "pretrain_world",
                   help="where the pretraining run goes (or is, with --skip-train)")
    p.add_argument("--out", type=Path, default=BASE_DIR, help="the base folder to write (default: the shipped one)")
    p.add_argument("--skip-train", action="store_true", help="ship an existing run dir")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted build in --run-dir (trainer.resume=auto), then ship it")
    p.add_argument("--max-mib", type=float, default=MAX_MIB)
    p.add_argument("overrides", nargs="*", help="extra train.py overrides (recipe development)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_dir = a.run_dir.resolve()
    training = None
    if not a.skip_train and not a.resume:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FileExistsError(f"{run_dir} is not empty: delete it, pass another --run-dir, or ship it with "
                                  "--skip-train")
        training = train(run_dir, list(a.overrides))
    elif a.resume:
        # an interrupted build (SIGTERM saves a checkpoint): continue it exactly, then ship
        training = train(run_dir, [*a.overrides, "trainer.resume=auto"])
        training.update(resumed=True, first_start=_first_start(run_dir), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    manifest = ship(run_dir, a.out.resolve(), training=training, max_mib=a.max_mib)
    log.info("shipped %s: sha256 %s, %d bytes", a.out, manifest["sha256"], manifest["bytes"])
    return manifest


if __name__ == "__main__":
    main()
