"""Fine-tune a CLIP/SigLIP model with the GCL multi-field loss: ``python train.py [overrides]``."""
import sys

import hydra
from omegaconf import DictConfig

import gcl.config  # registers the config schemas; check_cli


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from gcl.train import run  # here, so a command-line mistake is reported before torch is imported

    return run(cfg)


if __name__ == "__main__":
    gcl.config.check_cli(sys.argv[1:])
    main()
