"""gcl.data.batch: duplicate ids are what the encoder sees (token rows), checked against the tokenizer itself and
an SigLIP loss written here in float64 with labels taken from token-row equality."""
from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from gcl.data.batch import _Collator, token_row_ids
from gcl.data.schema import stable_hash
from gcl.loss import build_loss

CTX = 8  # SOT + 6 tokens + EOT: "red cotton midi dress with long" fills it, anything after is cut
TEXTS = [
    "Black",  # 0 \ same tokens: the tokenizer lower-cases
    "black",  # 1 /
    "red cotton midi dress with long sleeves",  # 2 \ equal after truncation at CTX
    "red cotton midi dress with long skirt",  # 3  |
    "Red  cotton midi dress with long sleeves, knee length",  # 4 / case, whitespace and truncation at once
]


@pytest.fixture(scope="module")
def tok():
    return open_clip.get_tokenizer("ViT-B-32")  # open_clip's SimpleTokenizer (lower-cases, collapses whitespace)


def _collate(tok, texts: list[str | None]) -> dict:
    samples = [{"text": {"colors": t}, "image": torch.zeros(3, 2, 2), "key": f"k{i}", "item_id": f"item{i}",
                "score": math.nan, "position": math.nan} for i, t in enumerate(texts)]
    return _Collator(tok, {"colors": CTX}, ["colors"], trim=True)(samples, {})


def test_text_ids_equal_exactly_when_token_rows_are_equal(tok):
    texts = [*TEXTS, "black  white", "Black white", "black, white", None, "navy"]
    batch = _collate(tok, texts)
    ids = batch["text_id"]["colors"].tolist()
    ref = tok([t or "" for t in texts], context_length=CTX)  # the reference: the tokenizer at the field's length
    assert ids[texts.index(None)] == 0
    present = [i for i, t in enumerate(texts) if t is not None]
    assert all(ids[i] != 0 for i in present)
    for i in present:
        for j in present:
            assert (ids[i] == ids[j]) == torch.equal(ref[i], ref[j]), (texts[i], texts[j])
    # the cases of the issue really are duplicates here (distinct strings, one token row), and others are not
    assert ids[0] == ids[1] and ids[2] == ids[3] == ids[4] and ids[5] == ids[6]
    assert len({ids[0], ids[2], ids[5], ids[7], ids[9]}) == 5
    # ids do not depend on the batch's trimmed width (batches and ranks trim differently; ids are gathered)
    narrow = _collate(tok, ["black", None])
    assert narrow["tokens"]["colors"].shape[1] < batch["tokens"]["colors"].shape[1]
    assert narrow["text_id"]["colors"][0] == batch["text_id"]["colors"][1]
    wide = torch.nn.functional.pad(batch["tokens"]["colors"], (0, 5))  # concat_batches pads with pad_id
    assert torch.equal(token_row_ids(wide, batch["present"]["colors"], 0), batch["text_id"]["colors"])


def _siglip_fp64(text: torch.Tensor, image: torch.Tensor, scale: float, bias: float, positive: torch.Tensor):
    logits = scale * F.normalize(text, dim=1) @ F.normalize(image, dim=1).T + bias
    labels = torch.where(positive, 1.0, -1.0).to(text.dtype)
    return torch.log1p(torch.exp(-labels * logits)).sum() / text.shape[0]


def test_siglip_five_rows_duplicates_follow_token_rows(tok):
    """5 products whose texts collapse to 2 token rows. Text features are a function of the token row (as any
    encoder's), so rows 0/1 and 2/3/4 have identical features and must be positives of each other. The loss with
    the collator's ids equals float64 SigLIP with labels from token-row equality; the raw-string ids of before
    label those pairs negative and give a larger loss."""
    batch = _collate(tok, TEXTS)
    tokens = batch["tokens"]["colors"]
    g = torch.Generator().manual_seed(0)
    table = torch.randn(49408, 16, generator=g, dtype=torch.float64)
    pos_w = torch.randn(tokens.shape[1], 1, generator=g, dtype=torch.float64)
    text = (table[tokens] * pos_w).sum(dim=1)  # [5, 16], a toy tower that sees only the tokens
    image = text + 0.5 * torch.randn(text.shape, generator=g, dtype=torch.float64)
    scale, bias = 20.0, -10.0
    full = tok(TEXTS, context_length=CTX)
    same_tokens = torch.tensor([[torch.equal(a, b) for b in full] for a in full])
    ref = _siglip_fp64(text, image, scale, bias, same_tokens)

    loss = build_loss("siglip", [{"name": "c", "left": {"fields": ["colors"]}, "right": {"fields": ["image"]}}],
                      duplicates=True)
    ls, lb = torch.tensor(math.log(scale), dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)
    feats = {"colors": text, "image": image}
    got = loss(feats, batch, ls, lb)["loss"]
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)

    strings = dict(batch, text_id={"colors": torch.tensor([stable_hash(t) for t in TEXTS])})
    old = loss(feats, strings, ls, lb)["loss"]
    torch.testing.assert_close(old, _siglip_fp64(text, image, scale, bias, torch.eye(5, dtype=torch.bool)),
                               rtol=1e-9, atol=1e-12)
    assert float(old) > float(ref) + 1.0, (float(old), float(ref))
