"""Words: a product's text fields, corrupted titles and search queries, all written from its attributes.

Lives here: ``make_texts`` (title, description, colors, materials, categories, details, keywords, built from
templates and synonyms), ``noisy_title`` (scraped-data corruptions) and ``make_query`` (a query that showed
the product, with its relevance score).

Not here: the vocabularies themselves (``attributes``), which fields go missing and the ranking positions
among products (``write``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from gcl.data.catalog.attributes import (
    _ACCENT_DETAILS,
    _PARENT_NOUN,
    COLOR_NAMES,
    COLORS,
    DETAILS,
    HIERARCHY,
    MATERIAL_NAMES,
    MATERIALS,
    PATTERN_NAMES,
    PATTERNS,
    SUBCATEGORIES,
    _pick,
)

# ============================================================================================ text

def _title_case(s: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in s.split())


def _noun(attrs: dict[str, Any], rng: np.random.Generator) -> str:
    sub = attrs["subcategory"]
    d = attrs["details"]
    if sub == "sweaters" and "hood" in d:
        return "hoodie"
    if sub == "boots":
        return "ankle boots" if "ankle height" in d else "knee-high boots"
    if sub == "hats":
        return "bucket hat" if "bucket shape" in d else _pick(rng, ("fedora", "wide-brim hat"))
    if sub == "sneakers" and "high-top" in d:
        return _pick(rng, ("high-top sneakers", "high-tops"))
    return _pick(rng, SUBCATEGORIES[sub].nouns)


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _season(attrs: dict[str, Any]) -> str:
    d, m, sub = attrs["details"], attrs["material"], attrs["subcategory"]
    if m in ("wool", "corduroy") or sub in ("coats", "boots", "scarves") or "turtleneck" in d:
        return "winter"
    if m == "linen" or "sleeveless" in d or sub in ("shorts", "hats") or (m == "silk" and sub.endswith("dresses")):
        return "summer"
    return "all season"


def _style(attrs: dict[str, Any]) -> str:
    d, m, sub = attrs["details"], attrs["material"], attrs["subcategory"]
    if sub in ("sneakers", "caps", "backpacks") or "hood" in d or "graphic print" in d:
        return "sporty"
    if sub in ("shirts", "coats", "heels") or "pencil" in d or m == "silk" or (sub == "handbags" and m == "leather"):
        return "smart"
    return "casual"


def make_texts(attrs: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """The text fields of a product (all present; missing values are applied later).

    Returns ``title`` (str), ``description`` (str, 20..80 words), ``colors``, ``materials``, ``categories``
    ([parent, child]), ``details``, ``keywords`` (lists of str). The steps draw from ``rng`` in a fixed
    order (noun and synonyms, title, description, keywords): reordering them changes every text.
    """
    color, mat = attrs["color"], attrs["material"]
    noun = _noun(attrs, rng)
    csyn = _pick(rng, COLORS[color][1]) if rng.random() < 0.6 else color
    msay = _pick(rng, MATERIALS[mat]["say"])
    title = _make_title(attrs, noun, csyn, rng)
    description = _make_description(attrs, noun, csyn, msay, rng)
    return {"title": title, "description": description, **_list_fields(attrs, rng)}


def _make_title(attrs: dict[str, Any], noun: str, csyn: str, rng: np.random.Generator) -> str:
    """One of five title templates, title-cased."""
    mat, pat, det = attrs["material"], attrs["pattern"], list(attrs["details"])
    padj = PATTERNS[pat][0]
    pat_word = "" if pat == "plain" else padj + " "
    feature = _pick(rng, det) if det else None
    t = int(rng.integers(5))
    if t == 0:
        title = f"{csyn} {pat_word}{mat} {noun}"
    elif t == 1:
        title = f"{pat_word}{noun} in {csyn} {mat}"
    elif t == 2 and feature:
        title = f"{csyn} {pat_word}{noun} with {feature}"
    elif t == 3:
        title = f"{mat} {noun} - {csyn}"
    else:
        title = f"{csyn} {pat_word}{noun}"
    return _title_case(title)


def _make_description(attrs: dict[str, Any], noun: str, csyn: str, msay: str, rng: np.random.Generator) -> str:
    """An opening, then the body sentences in a random order, then filler sentences until 20..80 words."""
    plural = noun.endswith("s") and not noun.endswith("dress")
    opening = _opening(noun, csyn, msay, plural, rng)
    sentences = _body_sentences(attrs, plural, rng)
    fillers = _fillers(attrs["material"], attrs["category"], rng)
    order = rng.permutation(len(sentences))
    body = [sentences[int(i)] for i in order]
    words = lambda parts: sum(len(s.split()) for s in parts)  # noqa: E731
    text = [opening] + body
    # Always add one or two filler sentences (variety), more while below 20 words; drop from the end past 80.
    n_fill = 1 + int(rng.integers(2))
    text += fillers[:n_fill]
    k = n_fill
    while words(text) < 20 and k < len(fillers):
        text.append(fillers[k])
        k += 1
    while words(text) > 80 and len(text) > 2:
        text.pop()
    description = " ".join(text)
    if words(text) < 20:  # cannot happen with the sentence pools above; fail loudly if they change
        raise AssertionError(f"description too short: {description!r}")
    return description


def _opening(noun: str, csyn: str, msay: str, plural: bool, rng: np.random.Generator) -> str:
    """The description's first sentence: the color, the noun and the material."""
    are = "are" if plural else "is"
    o = int(rng.integers(4))
    if o == 0:
        opening = f"This {csyn} {noun} {are} made from {msay}."
    elif o == 1:
        opening = f"A {csyn} {noun} cut from {msay}." if not plural else f"{_title_case(csyn)} {noun} crafted in {msay}."
    elif o == 2:
        opening = f"Meet our {noun} in {csyn} {msay}."
    else:
        opening = f"{_title_case(csyn)} {msay} {noun} for everyday wear."
    return opening


def _body_sentences(attrs: dict[str, Any], plural: bool, rng: np.random.Generator) -> list[str]:
    """Sentences on the pattern, the details (and an accent's color), the material's feel and the style."""
    sec, mat, pat, det = attrs["secondary_color"], attrs["material"], attrs["pattern"], list(attrs["details"])
    it = "They" if plural else "It"
    has = "have" if plural else "has"
    are = "are" if plural else "is"
    sentences: list[str] = []
    if pat != "plain":
        ssyn = _pick(rng, COLORS[sec][1])
        sentences.append(_pick(rng, (f"{it} {are} finished with {_pick(rng, PATTERNS[pat][1:])} in {ssyn}.",
                                     f"The design features {_pick(rng, PATTERNS[pat][1:])} in {ssyn}.")))
    if det:
        phrases = [_pick(rng, DETAILS[x]) for x in det]
        accent = [x for x in det if x in _ACCENT_DETAILS]
        sentences.append(_pick(rng, (f"Details include {_join(phrases)}.", f"{it} {has} {_join(phrases)}.",
                                     f"Look for {_join(phrases)}.")))
        if accent and pat == "plain":
            sentences.append(f"The {accent[0]} comes in {_pick(rng, COLORS[sec][1])}.")
    sentences.append(_pick(rng, (f"The {mat} feels {_pick(rng, MATERIALS[mat]['feel'])}.",
                                 f"{_title_case(mat)} keeps {'them' if plural else 'it'} {_pick(rng, MATERIALS[mat]['feel'])}.")))
    season, style = _season(attrs), _style(attrs)
    sentences.append(_pick(rng, (
        f"A {style} piece for {season if season != 'all season' else 'any season'}.",
        f"Easy to style for a {style} look" + (f" in {season}." if season != "all season" else " all year round."),
        f"Pair {'them' if plural else 'it'} with your favourite {style} staples.")))
    return sentences


def _fillers(mat: str, parent: str, rng: np.random.Generator) -> list[str]:
    """Care, praise, fit (or size, for bags and accessories) and service sentences, in that order."""
    return [
        _pick(rng, MATERIALS[mat]["care"]),
        _pick(rng, ("Designed to last for many seasons.", "A versatile wardrobe essential.",
                    "Our designers love this one.", "Part of our core collection.")),
        _pick(rng, ("True to size.", "Regular fit.", "Fits true to size; take your usual size.",
                    "Model is 178 cm and wears size M.")) if parent not in ("bags", "accessories") else
        _pick(rng, ("One size.", "Comes with a dust bag.", "Measurements are listed in the size guide.")),
        _pick(rng, ("Free returns within 30 days.", "Responsibly made.", "Ships in recyclable packaging.")),
    ]


def _list_fields(attrs: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """``colors``, ``materials``, ``categories``, ``details`` and ``keywords`` (in the order of the JSON)."""
    color, sec, mat, pat = attrs["color"], attrs["secondary_color"], attrs["material"], attrs["pattern"]
    sub, parent, det = attrs["subcategory"], attrs["category"], list(attrs["details"])
    padj = PATTERNS[pat][0]
    colors = [color] + ([sec] if sec else [])
    if sub == "sneakers" and "white" not in colors:
        colors.append("white")  # the rubber sole
    materials = [mat] + (["rubber"] if sub in ("sneakers", "boots") else [])
    keywords = [SUBCATEGORIES[sub].nouns[0], parent, color, mat] + ([padj] if pat != "plain" else [])
    keywords += [_style(attrs), _season(attrs)]
    if rng.random() < 0.5:
        keywords.append(_pick(rng, COLORS[color][1][1:]))
    keywords = list(dict.fromkeys(keywords))
    return {"colors": colors, "materials": materials, "categories": [parent, sub], "details": det,
            "keywords": keywords}


def noisy_title(title: str, rng: np.random.Generator) -> str:
    """A corrupted title as in scraped data: a dropped word, swapped words, lower case or a typo."""
    words = title.split()
    kind = int(rng.integers(4))
    if kind == 0 and len(words) >= 3:
        del words[int(rng.integers(len(words)))]
    elif kind == 1 and len(words) >= 2:
        i = int(rng.integers(len(words) - 1))
        words[i], words[i + 1] = words[i + 1], words[i]
    elif kind == 2:
        words = [w.lower() for w in words]
    else:
        i = int(np.argmax([len(w) for w in words]))
        w = words[i]
        if len(w) >= 3:
            j = int(rng.integers(len(w) - 1))
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        else:
            words = [x.lower() for x in words]
    out = " ".join(words)
    return out if out != title else title.lower() + "s"


# ============================================================================================ queries

_QUERY_WEIGHTS = {"category": 0.4, "color": 0.3, "pattern": 0.15, "material": 0.15}


def make_query(attrs: dict[str, Any], rng: np.random.Generator) -> tuple[str, int]:
    """A search query for which this product was shown, and its relevance score (1..100).

    The query names 1..4 attributes (category always; color / pattern / material sometimes), taken from the
    product and, 40% of the time, with one attribute swapped for another value, so scores spread out. Score
    = 1 + 99 x (weighted share of the query's attributes the product matches; a parent-only category match
    counts half).
    """
    q: dict[str, str] = {}
    child = rng.random() < 0.6
    q["category"] = attrs["subcategory"] if child else attrs["category"]
    for k, p in (("color", 0.65), ("pattern", 0.3), ("material", 0.25)):
        if rng.random() < p and not (k == "pattern" and attrs["pattern"] == "plain" and rng.random() < 0.7):
            q[k] = attrs[k]
    if rng.random() < 0.4:  # a partially relevant impression
        k = _pick(rng, sorted(q))
        if k == "category":
            q[k] = _pick(rng, [c for c in (SUBCATEGORIES if child else HIERARCHY) if c != q[k]])
        else:
            pool = {"color": COLOR_NAMES, "pattern": PATTERN_NAMES, "material": MATERIAL_NAMES}[k]
            q[k] = _pick(rng, [v for v in pool if v != q[k]])
    got = total = 0.0
    for k, v in q.items():
        wgt = _QUERY_WEIGHTS[k]
        total += wgt
        if k == "category":
            if v == attrs["subcategory"] or v == attrs["category"]:
                got += wgt
            elif v in SUBCATEGORIES and SUBCATEGORIES[v].parent == attrs["category"]:
                got += wgt / 2
        elif v == attrs[k]:
            got += wgt
    score = int(round(1 + 99 * got / total))
    cat = q["category"]
    noun = SUBCATEGORIES[cat].nouns[0] if cat in SUBCATEGORIES else _PARENT_NOUN[cat]
    pat = q.get("pattern")
    words = [q.get("color"), PATTERNS[pat][0] if pat and pat != "plain" else None, q.get("material"), noun]
    return " ".join(w for w in words if w), score
