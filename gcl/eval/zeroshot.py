"""Zero-shot classification over label prompts, scored by (support-)weighted macro F1 (FashionCLIP's protocol).

Each class is the normalized mean of its normalized prompt embeddings (one prompt per template, ``"{}"``
replaced by the label); a document's predicted class is the one with the highest cosine to its image
(fp32). Metrics: ``accuracy``, ``f1_weighted`` (per-class F1 averaged with weights = true support),
``f1_macro`` (unweighted mean over the classes that occur in the truth or the predictions).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def prompts(label: str, templates: Sequence[str]) -> list[str]:
    """The prompt strings of one label: each template with ``{}`` replaced by the label."""
    return [t.replace("{}", label) for t in templates]


def class_embeddings(encode: Callable[[list[str]], torch.Tensor], labels: Sequence[str],
                     templates: Sequence[str]) -> torch.Tensor:
    """FloatTensor[C, D]: per label, normalize(mean_t normalize(encode(template_t(label)))).

    ``encode`` maps a list of strings to FloatTensor[n, D] (any norm).
    """
    texts = [p for lab in labels for p in prompts(lab, templates)]
    emb = F.normalize(encode(texts).float(), dim=-1).view(len(labels), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def predict(image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """LongTensor[N]: argmax over classes of the fp32 cosine between FloatTensor[N,D] and FloatTensor[C,D]."""
    sims = F.normalize(image_emb.float(), dim=-1) @ F.normalize(class_emb.float(), dim=-1).T
    return sims.argmax(dim=1)


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> dict[str, float]:
    """accuracy, f1_weighted and f1_macro of integer labels in [0, num_classes)."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.size == 0:
        return {"accuracy": float("nan"), "f1_weighted": float("nan"), "f1_macro": float("nan")}
    tp = np.bincount(t[t == p], minlength=num_classes).astype(np.float64)
    support = np.bincount(t, minlength=num_classes).astype(np.float64)
    predicted = np.bincount(p, minlength=num_classes).astype(np.float64)
    # F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (support + predicted); 0 where the class never occurs.
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    seen = denom > 0
    return {
        "accuracy": float((t == p).mean()),
        "f1_weighted": float((f1 * support).sum() / support.sum()),
        "f1_macro": float(f1[seen].mean()),
    }


def evaluate_zeroshot(image_emb: torch.Tensor, labels: Sequence[str | None], class_names: Sequence[str],
                      class_emb: torch.Tensor, metrics: Sequence[str],
                      present: torch.Tensor | None = None) -> tuple[dict[str, float], torch.Tensor, list[int]]:
    """Classify documents and score them.

    Args:
        image_emb: FloatTensor[N, D]; labels: N true label strings (None = unlabeled); class_emb: [C, D].
        present: BoolTensor[N], False where the document has no image.
    Returns: (metric -> value, LongTensor[M] predicted class per scored document, the M scored rows).
    Documents without an image, without a label, or whose label is not a class are skipped (counted, logged).
    """
    index = {c: i for i, c in enumerate(class_names)}
    rows = [i for i, lab in enumerate(labels)
            if lab is not None and lab in index and (present is None or bool(present[i]))]
    skipped = len(labels) - len(rows)
    if skipped:
        log.warning("zero-shot: skipped %d of %d documents (no image, no label, or label not among the %d "
                    "classes)", skipped, len(labels), len(class_names))
    pred = predict(image_emb[rows], class_emb) if rows else torch.zeros(0, dtype=torch.long)
    y_true = [index[labels[i]] for i in rows]  # type: ignore[index]
    values = classification_metrics(y_true, pred.tolist(), len(class_names))
    return {m: values[m] for m in metrics}, pred, rows
