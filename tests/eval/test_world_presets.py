"""The retention presets: eval=world reads the world's splits whatever the training data, eval=synthetic_world
puts the fashion suite (synthetic/...) and the world suite (world/...) side by side in one in-loop evaluation,
and the config rules for generated-dataset splits name their keys."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import CONF, FAST, compose

from gcl.config import ConfigError, validate
from gcl.data import resolve_splits


def _load(name: str) -> dict:
    return yaml.safe_load((CONF / "eval" / f"{name}.yaml").read_text())


def test_synthetic_world_is_the_two_suites_with_their_names() -> None:
    """The composed preset holds exactly the tasks and aggregates of eval/synthetic.yaml and eval/world.yaml,
    each named with its suite (the fashion tasks read the catalog's splits explicitly), so the three files
    cannot drift apart."""
    both, syn, world = _load("synthetic_world"), _load("synthetic"), _load("world")
    assert both["name"] == ""
    want = [{**t, "name": f"synthetic/{t['name']}", "split": f"synthetic/{t['split']}"} for t in syn["tasks"]]
    want += [{**t, "name": f"world/{t['name']}"} for t in world["tasks"]]
    assert both["tasks"] == want
    aggs = [{**a, "name": f"{p}/{a['name']}", "tasks": [f"{p}/{x}" for x in a["tasks"]]}
            for p, cfg in (("synthetic", syn), ("world", world)) for a in cfg["aggregates"]]
    assert both["aggregates"][:-1] == aggs and both["aggregates"][-1]["name"] == "both/text2image"
    assert {**syn["means"], **world["means"]} == both["means"]


def test_generated_dataset_rules_name_the_key() -> None:
    validate(compose("train", ["eval=synthetic_world"]))
    validate(compose("train", ["experiment=pretrain_world"]))
    with pytest.raises(ConfigError, match=r"data\.builtin"):
        validate(compose("train", ["data.builtin=imagenet"]))
    with pytest.raises(ConfigError, match=r"eval\.tasks\[0\]\.split.*world/<split>"):
        validate(compose("train", ["eval=world", "eval.tasks.0.split=imagenet/test"]))
    with pytest.raises(ConfigError, match=r"loss\.terms\[0\]\.left\.fields.*caption"):
        validate(compose("train", ["loss=world"]))  # the fashion catalog has no caption field


def test_demo_summary_names_are_checked_against_the_suite() -> None:
    """experiment=demo: the shipped base's weights, both suites, a before/after table of metrics the suite
    reports; a misspelt summary metric fails before anything is built, naming the key and the closest name."""
    from gcl.assets import BASE_WEIGHTS

    cfg = compose("train", ["experiment=demo"])
    validate(cfg)
    assert cfg.model.pretrained == str(BASE_WEIGHTS) and cfg.eval.summary
    assert {n.split("/")[0] for n in cfg.eval.summary} == {"synthetic", "world"}
    with pytest.raises(ConfigError, match=r"eval\.summary\[1\].*did you mean world/zeroshot_class/f1_weighted"):
        validate(compose("train", ["experiment=demo",
                                   "eval.summary=[world/avg/zeroshot/accuracy,world/zeroshot_clas/f1_weighted]"]))


def test_resolve_splits_adds_generated_splits_on_request(tmp_path: Path) -> None:
    cfg = compose("train", [f"data.world.cache_dir={tmp_path / 'w'}", "data.world.samples=24",
                            "data.world.workers=1", "data.train_shards='/data/shard-{000000..000003}.tar'"])
    assert resolve_splits(cfg.data) == {"train": "/data/shard-{000000..000003}.tar", "val": None, "test": None}
    assert not (tmp_path / "w").exists()  # nothing asked for the world: nothing generated
    splits = resolve_splits(cfg.data, extra=["val", "world/test", "world/test_heldout"])
    assert splits["train"] == "/data/shard-{000000..000003}.tar" and splits["val"] is None
    meta = json.loads(next((tmp_path / "w").glob("world-*/world.json")).read_text())
    for s in ("train", "val", "test", "test_heldout"):
        assert splits[f"world/{s}"] == meta["splits"][s]["pattern"]


def test_fashion_fine_tune_evaluates_both_suites_in_loop(tmp_path: Path, catalog_cache: Path) -> None:
    """A short fashion fine-tune with eval=synthetic_world logs synthetic/... and world/... metrics in every
    evaluation, and the best-checkpoint rule can weigh both (both/text2image)."""
    from gcl.train import Trainer

    cfg = compose("train", [*FAST, f"data.synthetic.cache_dir={catalog_cache}", "eval=synthetic_world",
                            f"data.world.cache_dir={tmp_path / 'world'}", "data.world.samples=160",
                            "data.world.workers=1", "trainer.max_steps=2", "trainer.eval_every=2",
                            "trainer.best_metric=both/text2image/mrr@10", "eval.gallery.enabled=false",
                            "eval.tasks.0.num_queries=20", "eval.tasks.1.num_queries=20",
                            "eval.tasks.7.num_queries=20", f"hydra.run.dir={tmp_path / 'run'}"])
    validate(cfg)
    Trainer(cfg, tmp_path / "run").fit()
    evals = sorted((tmp_path / "run" / "eval").glob("step_*.json"))
    assert [p.name for p in evals] == ["step_000000.json", "step_000002.json"]
    metrics = json.loads(evals[-1].read_text())
    suites = {k.split("/")[0] for k in metrics}
    assert suites == {"synthetic", "world", "both"}, suites
    for task in ("synthetic/text2image_title/recall@10", "synthetic/zeroshot_subcategory/f1_weighted",
                 "world/zeroshot_class/f1_weighted", "world/zeroshot_color/accuracy", "world/text2image/mrr@10",
                 "world/heldout_text2image/recall@1", "world/avg/zeroshot/f1_weighted", "both/text2image/mrr@10"):
        assert 0.0 <= metrics[task] <= 1.0, task
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
