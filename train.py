"""Fine-tune a CLIP/SigLIP model with the GCL multi-field loss: ``python train.py [overrides]``."""
import hydra
from omegaconf import DictConfig

import gcl.config  # noqa: F401  (registers the config schemas)
from gcl.train import run


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
