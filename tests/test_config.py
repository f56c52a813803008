"""Config composition and fail-fast validation (before any model is built)."""
from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import CONF, FAST, ROOT, compose
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from gcl.config import ConfigError, validate


def test_default_config_composes_and_validates():
    cfg = compose("train")
    validate(cfg)
    assert cfg.model.name == "gcl-tiny"
    assert cfg.loss.kind == "clip" and len(cfg.loss.terms) == 7
    assert cfg.logger.wandb.mode == "offline"


@pytest.mark.parametrize("override, key", [
    ("model.nme=x", "nme"),
    ("trainer.max_step=3", "max_step"),
    ("data.batchsize=8", "batchsize"),
])
def test_typo_in_override_names_the_key(override, key):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as e:
        compose("train", [override])
    msg = str(e.value) + str(e.value.__cause__)
    assert key in msg


def test_wrong_type_names_the_key():
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose("train", ["trainer.max_steps=many"])
    assert "max_steps" in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("overrides, key", [
    (["loss.terms.0.left.fields=[colour]"], "loss.terms[0].left.fields"),
    (["loss.terms.0.left.weights=[1.0,2.0]"], "loss.terms[0].left.weights"),
    (["loss.kind=softmax"], "loss.kind"),
    (["trainer.accum_steps=3", "data.batch_size=8"], "data.batch_size"),
    (["trainer.best_metric=x", "trainer.eval_every=0"], "trainer.best_metric"),
    (["sched=const_cooldown", "trainer.max_steps=10", "sched.cooldown_steps=50"], "sched.cooldown_steps"),
    (["model.text_packing=packed"], "model.text_packing"),
    (["loss.allow_absent_fields=[colour]"], "loss.allow_absent_fields"),  # not a field of the loss: a typo
    (["loss.allow_absent_fields=3"], "loss.allow_absent_fields"),
    (["optim.lr_image=-1"], "optim.lr_image"),  # was accepted: gradient ascent on the image tower
    (["optim.lr_text=-1e-5"], "optim.lr_text"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay"),
    (["optim.betas=[0.9,1.0]"], "optim.betas"),
    (["optim.eps=0"], "optim.eps"),
    (["optim.grad_clip=-1"], "optim.grad_clip"),
    (["sched.min_lr_ratio=1.5"], "sched.min_lr_ratio"),
    (["trainer.resume_changes=maybe"], "trainer.resume_changes"),
    (["trainer.strategy=deepspeed"], "trainer.strategy"),
    (["trainer.strategy=fsdp", "trainer.fsdp_checkpoint=shards"], "trainer.fsdp_checkpoint"),
    (["trainer.fsdp_checkpoint=sharded"], "trainer.fsdp_checkpoint"),  # ddp saves full checkpoints
    (["trainer.strategy=fsdp", "trainer.mixed_precision=fp16"], "trainer.mixed_precision"),
    (["trainer.strategy=fsdp", "model.compile=model"], "model.compile"),
    (["trainer.strategy=fsdp", "model.precision=bf16"], "model.precision"),
    (["trainer.strategy=fsdp", "trainer.fsdp_checkpoint=sharded", "trainer.remote_sync=s3://b/run"],
     "trainer.fsdp_checkpoint"),
])
def test_inconsistent_combinations_fail_naming_the_key(overrides, key):
    cfg = compose("train", overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert key in str(e.value)


def test_allowed_absent_field_passes_the_synthetic_field_check():
    validate(compose("train", ["loss.terms.0.left.fields=[colour]", "loss.allow_absent_fields=[colour]"]))
    validate(compose("train", ["loss.terms.0.left.fields=[colour]", "loss.allow_absent_fields=true"]))


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiment_presets_compose_and_validate(name):
    cfg = compose("train", [f"experiment={name}"])
    validate(cfg)
    if name == "pretrain_world":  # the shipped base's recipe: trained from scratch
        assert cfg.model.name == "gcl-base" and cfg.model.pretrained is None
    elif name == "demo":  # fine-tunes the shipped base
        from gcl.assets import BASE_WEIGHTS

        assert cfg.model.name == "gcl-base" and cfg.model.pretrained == str(BASE_WEIGHTS)
    else:  # the published recipes start from real pretrained ViT-B-16 weights
        assert cfg.model.name.startswith("ViT-B-16")
        assert cfg.model.pretrained


def test_experiment_recipes_match_their_papers():
    clip = compose("train", ["experiment=marqo_fashionclip"])
    assert (clip.model.name, clip.model.pretrained, clip.loss.kind) == ("ViT-B-16", "laion2b_s34b_b88k", "clip")
    siglip = compose("train", ["experiment=marqo_fashionsiglip"])
    assert (siglip.model.name, siglip.model.pretrained, siglip.loss.kind) == ("ViT-B-16-SigLIP", "webli", "siglip")
    rank = compose("train", ["experiment=gcl_ranking"])
    (term,) = rank.loss.terms
    assert list(term.left.fields) == ["query"] and list(term.right.fields) == ["image", "title"]
    assert list(term.right.weights) == [0.9, 0.1] and term.score_to_weight == "linear"


def test_slurm_launcher_and_optuna_sweeper_presets_compose():
    cfg = compose("train", ["hydra/launcher=slurm", "hydra/sweeper=optuna_max"], return_hydra_config=True)
    launcher, sweeper = cfg.hydra.launcher, cfg.hydra.sweeper
    assert "submitit" in launcher._target_ and launcher.gpus_per_node == 8 and launcher.tasks_per_node == 8
    assert "optuna" in sweeper._target_.lower() and sweeper.direction == "maximize"


def test_slurm_env_maps_to_torch_env():
    from gcl.train import slurm_to_torch_env

    env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8(x2)"}
    slurm_to_torch_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("9", "16", "1", "8")
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "SLURM_NTASKS": "16", "SLURM_PROCID": "9"}
    slurm_to_torch_env(torchrun)
    assert torchrun["RANK"] == "3"  # torchrun's variables win


def test_cli_typo_fails_fast_before_building(tmp_path):
    """The real entry point: a misspelled key exits non-zero naming it, without building a model."""
    r = subprocess.run([sys.executable, "train.py", *FAST, "trainer.max_stepz=3", f"hydra.run.dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "max_stepz" in r.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_cli_inconsistent_loss_field_fails_fast(tmp_path):
    r = subprocess.run([sys.executable, "train.py", *FAST, "loss.terms.0.left.fields=[colour]",
                        f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "loss.terms[0].left.fields" in r.stderr and "colour" in r.stderr
    # the run dir keeps the cause too (on a cluster, stderr is often lost)
    assert "loss.terms[0].left.fields" in (tmp_path / "train.log").read_text()


def test_best_metric_is_checked_against_the_suites_names_with_a_suggestion():
    """Before any model is built: the name must be one the eval suite reports; the closest is suggested."""
    cfg = compose("train", ["trainer.best_metric=synthetic/mean/recall@10", "trainer.eval_every=100"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert msg.startswith("trainer.best_metric:") and "did you mean synthetic/" in msg
    assert msg.count("\n") == 0 and len(msg) < 400  # one line, not the 52 names
    suggested = msg.split("did you mean ")[1].split(" or ")[0].rstrip("?")
    validate(compose("train", [f"trainer.best_metric={suggested}", "trainer.eval_every=100"]))


def test_metric_names_follow_the_suite_config():
    """Names from the config alone, by the rules of the runner (tasks x metrics, the per-task means where all
    parts exist, aggregates over the metrics their tasks share): checked here by hand on the synthetic suite;
    tests/test_readme.py checks them against a real evaluation."""
    from gcl.eval.tasks import metric_names

    names = metric_names(compose("train").eval)
    assert len(names) == len(set(names))
    assert "synthetic/text2image_title/recall@10" in names and "synthetic/text2image_title/avg_recall" in names
    assert "synthetic/zeroshot_subcategory/f1_weighted" in names
    assert "synthetic/zeroshot_subcategory/avg_recall" not in names  # its metrics lack the parts
    assert "synthetic/avg/text2image/recall@10" in names and "synthetic/avg/retrieval/ndcg@10" in names
    assert not any(n.startswith("synthetic/avg/retrieval/recall") for n in names)  # not listed there


@pytest.mark.parametrize("argv, shown", [
    (["data.train_shards=/data/shard-{000000..000099}.tar"],
     ["\"data.train_shards='/data/shard-{000000..000099}.tar'\"", "data.train_shards=/data ",
      "\"data.train_shards='/data/shard-*.tar'\""]),
    ([f"data.train_shards=/data/shard-{i:06d}.tar" for i in range(100)],  # what bash makes of it unquoted
     ["given 100 times", "\"data.train_shards='/data/shard-{000000..000099}.tar'\"", "data.train_shards=/data"]),
])
def test_unquoted_brace_pattern_gets_one_line_with_the_working_forms(argv, shown, capsys):
    from gcl.config import check_cli

    with pytest.raises(SystemExit) as e:
        check_cli(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    for s in shown:
        assert s in err, s
    check_cli(["\"data.train_shards='/d/s-{0..9}.tar'\"".strip('"'), "data.train_shards_x=/d", "-m"])  # fine


def test_cli_unquoted_shards_fail_before_hydra(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "data.train_shards=/data/shard-{000000..000099}.tar",
                        f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "mismatched input" not in r.stderr
    assert r.stderr.startswith("error: data.train_shards=") and "'/data/shard-{000000..000099}.tar'" in r.stderr


def test_default_run_dir_is_rank0s_and_other_ranks_write_elsewhere(monkeypatch):
    """Ranks may start in different seconds: only rank 0 gets the ${now:...} run dir under outputs/."""
    import tempfile

    for var in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    cfg = compose("train", return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith("outputs/")
    monkeypatch.setenv("RANK", "3")
    cfg = compose("train", return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith(tempfile.gettempdir()) and "gcl-rank3" in cfg.hydra.run.dir
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert "gcl-rank1" in compose("evaluate", return_hydra_config=True).hydra.run.dir
