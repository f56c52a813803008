"""Robust fine-tuning: keep what the base model knew while fine-tuning it.

* :mod:`gcl.finetune.ema`: the exponential moving average of the weights during training (``optim.ema``);
* :mod:`gcl.finetune.runs`: a run's fine-tuned weights, its base (starting weights), and same-base checks;
* :mod:`gcl.finetune.select`: scoring candidate weights on the selection split, and the choice rule;
* :mod:`gcl.finetune.wise`: WiSE-FT (``python -m gcl.wise RUN_DIR``, ``export.wise.alpha``);
* :mod:`gcl.finetune.soup`: uniform and greedy model soups (``python -m gcl.soup MULTIRUN_DIR``).

During training (elsewhere): layer-wise lr decay and per-tower weight decay in :mod:`gcl.optim`; LoRA in
:mod:`gcl.model.lora`; unlock schedules and patch dropout in :mod:`gcl.model.towers`.
"""
