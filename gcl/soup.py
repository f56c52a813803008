"""``python -m gcl.soup MULTIRUN_DIR``: uniform and greedy model soups (see :mod:`gcl.finetune.soup`)."""
from gcl.finetune.soup import main

if __name__ == "__main__":
    raise SystemExit(main())
