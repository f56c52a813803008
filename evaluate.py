"""Evaluate a model on a suite of retrieval / zero-shot tasks: ``python evaluate.py model.checkpoint=RUN_DIR eval=...``.

``model.checkpoint`` takes a run dir, a checkpoint file or an exported open_clip folder (a run without ``eval=`` is
evaluated with its own eval suite); without it ``model.name`` (+ ``model.pretrained``) names any open_clip model.
Results land in the Hydra run dir's ``eval/``.
"""
import sys

import hydra
from omegaconf import DictConfig

import gcl.config  # registers the config schemas; check_cli


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from gcl.eval.run import run  # here, so a command-line mistake is reported before torch is imported

    run(cfg)


if __name__ == "__main__":
    gcl.config.check_cli(sys.argv[1:])
    main()
