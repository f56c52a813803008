"""gcl.fsdp pieces that need no process group: which modules become FSDP2 units, and the one-process fallback
of trainer.strategy=fsdp (nothing to shard: the plain model trains, exactly as under ddp).

The sharded behaviour itself (2 gloo ranks) is in test_fsdp_dist.py and test_fsdp_resume.py."""
from __future__ import annotations

import pytest
import torch
from helpers import FAST, compose
from open_clip.transformer import ResidualAttentionBlock

from gcl.fsdp import block_modules


@pytest.mark.parametrize("model", ["tiny", "tiny_siglip"])
def test_units_are_every_transformer_block_of_both_towers(model, catalog_cache):
    from gcl.model import build_model

    m = compose("train", [f"model={model}"]).model
    bundle = build_model(m.name, None, precision="fp32", device=torch.device("cpu"), cache_dir=m.cache_dir)
    blocks = block_modules(bundle.model)
    # the reference: open_clip's block class, found by type rather than by the ModuleList names gcl looks for
    want = [x for x in bundle.model.modules() if isinstance(x, ResidualAttentionBlock)]
    assert len(want) == 6 and [id(b) for b in blocks] == [id(b) for b in want]


def test_fsdp_in_one_process_trains_the_plain_model_like_ddp(tmp_path, catalog_cache):
    from gcl.train import Trainer

    common = [*FAST, f"data.synthetic.cache_dir={catalog_cache}", "eval=none", "trainer.accum_steps=2"]
    runs = {}
    for strategy in ("ddp", "fsdp"):
        t = Trainer(compose("train", [*common, f"trainer.strategy={strategy}"]), tmp_path / strategy)
        assert not t.sharded and t.world_size == 1
        batch = next(iter(t.stream))
        loss = t.train_step(batch)["loss"].item()
        runs[strategy] = loss, {n: p.detach().clone() for n, p in t.model.state_dict().items()}
    assert runs["ddp"][0] == runs["fsdp"][0]
    assert all(torch.equal(runs["ddp"][1][n], w) for n, w in runs["fsdp"][1].items())
