"""README.md: every documented `train.py` / `evaluate.py` / `gcl.export` command is valid, and the worked example
of "Your data, your loss, your eval" runs as written (files in the user's own folder, `--config-dir`).

The parsing helpers are shared with tests/test_docker.py (which does the same for docker/README.md).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FAST, ROOT, code_blocks, shell_commands

README = (ROOT / "README.md").read_text()
SCRIPTS = ("train.py", "evaluate.py")


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, flags=re.S | re.M)
    assert m, f"README has no section {title!r}"
    return m.group(1)


def _user_files(text: str, root: Path) -> Path:
    """Write each yaml block that starts with ``# my_conf/...`` under ``root``; returns root/my_conf."""
    for block in code_blocks(text, "yaml"):
        first = block.splitlines()[0]
        assert first.startswith("# my_conf/"), first
        path = root / first[2:].strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block)
    return root / "my_conf"


def _script_commands(text: str) -> list[tuple[str, list[str], list[str]]]:
    """(script, flags, overrides) of every command line running train.py or evaluate.py."""
    out = []
    for lang in ("bash", "text"):
        for block in code_blocks(text, lang):
            for argv in shell_commands(block):
                i = next((i for i, a in enumerate(argv) if a in SCRIPTS), None)
                if i is None:
                    continue
                flags, overrides, rest = [], [], argv[i + 1:]
                while rest:
                    a = rest.pop(0)
                    if a == "--config-dir":
                        flags += [a, rest.pop(0)]
                    elif a.startswith("-"):
                        flags.append(a)
                    elif a != "...":
                        overrides.append(a)
                out.append((argv[i], flags, overrides))
    return out


def _each_sweep_value(overrides: list[str]) -> list[list[str]]:
    """A sweep (`-m a=1,2 b=x,y`) as the launches that cover every value: [a=1 b=x], [a=2 b=y]."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    values = [list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.input_line.split("=", 1)[1]]
              for o in parsed]
    n = max(len(v) for v in values)
    return [[f"{o.input_line.split('=', 1)[0]}={v[i % len(v)]}" for o, v in zip(parsed, values)] for i in range(n)]


def test_readme_commands_compose_and_validate(tmp_path):
    """Each documented launch names real keys and presets, passes the CLI check and gcl's validation (a
    best_metric the suite does not report, an unquoted brace pattern... would fail here)."""
    from hydra import compose, initialize_config_dir

    import gcl.config
    from gcl.eval.tasks import validate_tasks

    user_dir = _user_files(_section("Your data, your loss, your eval"), tmp_path)
    cmds = _script_commands(README)
    assert len(cmds) >= 8 and {c[0] for c in cmds} == set(SCRIPTS)
    for script, flags, overrides in cmds:
        gcl.config.check_cli(overrides)  # exits 2 on a pattern the shell or Hydra would mangle
        extra = [f"hydra.searchpath=[file://{user_dir}]"] if "--config-dir" in flags else []
        for launch in _each_sweep_value(overrides) if overrides else [[]]:
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose(script[:-3], [*launch, *extra], return_hydra_config=True)
            if script == "train.py":
                gcl.config.validate(cfg)
            else:
                validate_tasks(cfg.eval)


def test_readme_export_command_parses():
    from gcl.export import build_parser

    cmds = [argv for b in code_blocks(README, "bash") for argv in shell_commands(b) if "gcl.export" in argv]
    assert cmds
    for argv in cmds:
        build_parser().parse_args(argv[argv.index("gcl.export") + 1:])


def test_help_says_how_to_bring_your_own_presets():
    from helpers import compose

    for name in ("train", "evaluate"):
        footer = compose(name, return_hydra_config=True).hydra.help.footer
        assert "--config-dir" in footer and "Your data, your loss, your eval" in footer


def _with(argv: list[str], values: dict[str, str]) -> list[str]:
    """``argv`` with the given keys set (replaced where present, appended otherwise)."""
    out = [f"{a.split('=', 1)[0]}={values[a.split('=', 1)[0]]}" if a.split("=", 1)[0] in values else a for a in argv]
    have = {a.split("=", 1)[0] for a in out}
    return out + [f"{k}={v}" for k, v in values.items() if k not in have]


@pytest.mark.slow
def test_your_loss_and_eval_example_runs(tmp_path, catalog_cache):
    """The worked example as written, in a user folder, made small (steps, catalog size): the custom loss
    trains, the custom suite evaluates in the loop, and `evaluate.py model.checkpoint=RUN` without `eval=`
    evaluates with the run's own suite (every metric name the suite's config says)."""
    from omegaconf import OmegaConf

    from gcl.eval.schema import EvalConfig
    from gcl.eval.tasks import metric_names

    text = _section("Your data, your loss, your eval")
    _user_files(text, tmp_path)
    (train, evaluate), = [shell_commands(b) for b in code_blocks(text, "bash")]
    run = tmp_path / "outputs" / "my-run"
    small = dict(a.split("=", 1) for a in FAST)
    small.update({"trainer.max_steps": "2", "trainer.eval_every": "2", "hydra.run.dir": str(run),
                  "data.synthetic.cache_dir": str(catalog_cache), "eval.gallery.enabled": "false"})
    i = train.index("train.py")
    assert train[i + 1:i + 3] == ["--config-dir", "my_conf"]  # a folder of the user's, beside the run
    argv = [sys.executable, str(ROOT / "train.py"), *train[i + 1:i + 3], *_with(train[i + 3:], small)]
    r = subprocess.run(argv, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {k for r in rows for k in r if k.startswith("loss/")} == {"loss/title_image", "loss/colors_image"}
    assert json.loads((run / "checkpoints" / "best.json").read_text())["metric"] == "my_eval/title2image/recall@10"

    j = evaluate.index("evaluate.py")
    out = tmp_path / "eval-out"
    argv = [sys.executable, str(ROOT / "evaluate.py"),
            *_with(evaluate[j + 1:], {"model.checkpoint": str(run), "hydra.run.dir": str(out)})]
    assert not any(a.startswith("eval=") for a in argv)
    r = subprocess.run(argv, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((out / "eval" / "metrics.json").read_text())
    suite = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.load(tmp_path / "my_conf/eval/my_eval.yaml"))
    assert sorted(got) == sorted(metric_names(suite)) and all(k.startswith("my_eval/") for k in got)
