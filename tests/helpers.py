"""Helpers shared by tests (importable: pytest's pythonpath includes tests/)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Small, fast settings shared by trainer/eval tests: tiny model, tiny catalog, no wandb, no export.
FAST = [
    "trainer.max_steps=4", "trainer.eval_every=0", "trainer.save_every=0", "trainer.log_every=1",
    "data.batch_size=8", "data.num_workers=0", "data.synthetic.products=160", "data.synthetic.image_size=32",
    "logger.wandb.mode=disabled", "logger.progress=false", "export.enabled=false", "sched.warmup_steps=0",
]


def compose(config_name: str = "train", overrides: list[str] | None = None, return_hydra_config: bool = False):
    """hydra.compose over the repo's conf/ (the real configs users run)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import gcl.config  # noqa: F401  (registers schemas)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [],
                             return_hydra_config=return_hydra_config)
