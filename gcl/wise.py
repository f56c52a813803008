"""``python -m gcl.wise RUN_DIR``: WiSE-FT for retrieval (see :mod:`gcl.finetune.wise`)."""
from gcl.finetune.wise import main

if __name__ == "__main__":
    raise SystemExit(main())
