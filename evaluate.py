"""Evaluate a model on a suite of retrieval / zero-shot tasks: ``python evaluate.py model.checkpoint=RUN_DIR eval=...``.

``model.checkpoint`` takes a run dir, a checkpoint file or an exported open_clip folder; without it
``model.name`` (+ ``model.pretrained``) names any open_clip model. Results land in the Hydra run dir's ``eval/``.
"""
import hydra
from omegaconf import DictConfig

import gcl.config  # noqa: F401  (registers the config schemas)
from gcl.eval.run import run


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
