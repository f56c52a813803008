"""Text of a world scene: the canonical ``title`` and ``sentence``, a ``caption`` in a varied form (a short
label, a sentence, or an attribute list), and the flat attribute fields the loss and the evaluation read.

Every string is written from the scene dict (``scene``) alone; ``rng`` only picks the wording.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from gcl.data.world.vocab import BACKGROUNDS, CLASSES, COUNT_WORDS, PATTERNS, RELATIONS, article

CAPTION_FORMS: tuple[str, ...] = ("label", "sentence", "attributes")
_FORM_P = (0.35, 0.4, 0.25)
_REL_PHRASES = {"left of": ("left of", "to the left of", "on the left of"),
                "right of": ("right of", "to the right of", "on the right of"),
                "above": ("above", "over"), "below": ("below", "under", "beneath")}


def _pick(r: np.random.Generator, seq: Any) -> Any:
    return seq[int(r.integers(len(seq)))]


def noun_phrase(obj: dict[str, Any], *, color: bool = True, pattern: str = "with", det: bool = True,
                generic: bool = False) -> str:
    """"two red cups with white stripes" (pattern="with"), "two red striped cups" ("adj") or without the
    pattern ("none"); ``det=False`` drops "a"/"an" (counts are always said); ``generic`` says "object"."""
    n = obj["count"]
    noun = ("object" if n == 1 else "objects") if generic else CLASSES[obj["label"]].noun(obj["label"], n)
    words = [obj["color"]] if color else []
    patterned = obj["pattern"] != "plain"
    if patterned and pattern == "adj":
        words.append(PATTERNS[obj["pattern"]][0])
    words.append(noun)
    s = " ".join(words)
    if patterned and pattern == "with":
        s += f" with {obj['pattern_color']} {PATTERNS[obj['pattern']][1]}"
    if n > 1:
        return f"{COUNT_WORDS[n]} {s}"
    return f"{article(s)} {s}" if det else s


def canonical(scene: dict[str, Any]) -> tuple[str, str]:
    """(title, sentence): "two red cups with white stripes", "... on grass"; pairs: "a red cup left of a blue
    key", "a red cup to the left of a blue key on grass"."""
    objs, rel = scene["objects"], scene["relation"]
    bg = BACKGROUNDS[scene["background"]].phrase
    if rel is None:
        np0 = noun_phrase(objs[0])
        return np0, f"{np0} {bg}"
    a, b = noun_phrase(objs[0]), noun_phrase(objs[1])
    return f"{a} {rel} {b}", f"{a} {_REL_PHRASES[rel][1]} {b} {bg}"


def _label_form(scene: dict[str, Any], r: np.random.Generator) -> str:
    objs, rel = scene["objects"], scene["relation"]
    opts = dict(color=r.random() > 0.1, pattern=_pick(r, ("adj", "with", "none")), det=r.random() > 0.3,
                generic=r.random() < 0.1)
    if rel is None:
        return noun_phrase(objs[0], **opts)
    a = noun_phrase(objs[0], pattern=opts["pattern"], det=opts["det"])
    b = noun_phrase(objs[1], pattern=opts["pattern"], det=opts["det"])
    if r.random() < 0.3:
        return f"{a} and {b}"
    if r.random() < 0.5:
        return f"{a} {rel} {b}"
    return f"{b} {RELATIONS[rel]} {a}"


def _sentence_form(scene: dict[str, Any], r: np.random.Generator) -> str:
    objs, rel = scene["objects"], scene["relation"]
    bg = BACKGROUNDS[scene["background"]].phrase
    pat = _pick(r, ("adj", "with"))
    if rel is None:
        np0 = noun_phrase(objs[0], pattern=pat)
        verb = "is" if objs[0]["count"] == 1 else "are"
        return _pick(r, (f"a photo of {np0} {bg}.", f"{np0} {bg}", f"there {verb} {np0} {bg}.",
                         f"a picture of {np0}.", f"{np0[0].upper()}{np0[1:]}, {bg}."))
    first, second, rel_ = (0, 1, rel) if r.random() < 0.5 else (1, 0, RELATIONS[rel])
    a, b = noun_phrase(objs[first], pattern=pat), noun_phrase(objs[second], pattern=pat)
    phrase = _pick(r, _REL_PHRASES[rel_])
    return _pick(r, (f"{a} {phrase} {b} {bg}", f"a photo of {a} {phrase} {b}.", f"{a} {phrase} {b}"))


def _attributes_form(scene: dict[str, Any], r: np.random.Generator) -> str:
    objs, rel = scene["objects"], scene["relation"]
    bg = BACKGROUNDS[scene["background"]].word

    def items(o: dict[str, Any]) -> list[tuple[str, str]]:
        out = [("object", o["label"]), ("color", o["color"])]
        if o["pattern"] != "plain":
            out.append(("pattern", f"{PATTERNS[o['pattern']][0]} {o['pattern_color']}"))
        return out

    pairs = items(objs[0])
    if rel is None:
        pairs.append(("count", COUNT_WORDS[objs[0]["count"]]))
    else:
        pairs.append(("relation", rel))
        pairs += [(f"other {k}", v) for k, v in items(objs[1])]
    if r.random() < 0.6:
        pairs.append(("background", bg))
    if r.random() < 0.5:
        return "; ".join(f"{k}: {v}" for k, v in pairs)
    return ", ".join(v for _, v in pairs)


def make_texts(scene: dict[str, Any], r: np.random.Generator) -> dict[str, str]:
    """Every text and attribute field of a scene (strings only, as the shard schema requires).

    Always: ``title``, ``sentence``, ``caption`` (form ``caption_form``), ``scene``, ``label``, ``category``,
    ``color``, ``pattern``, ``count`` ("1".."4", copies of ``label``), ``background``; patterned objects add
    ``pattern_color``; pair scenes add ``relation``, ``label2``, ``color2``, ``pattern2`` (and
    ``pattern_color2``), read as "<label> <relation> <label2>"; single scenes add ``single_label`` and
    ``single_color`` (every object in the picture is of that class and colour: what zero-shot classification
    scores, so a pair scene's second object never makes the truth ambiguous).
    """
    title, sentence = canonical(scene)
    form = CAPTION_FORMS[int(r.choice(len(CAPTION_FORMS), p=_FORM_P))]
    caption = {"label": _label_form, "sentence": _sentence_form, "attributes": _attributes_form}[form](scene, r)
    o = scene["objects"][0]
    out = {"title": title, "sentence": sentence, "caption": caption, "caption_form": form, "scene": scene["scene"],
           "label": o["label"], "category": CLASSES[o["label"]].category, "color": o["color"],
           "pattern": o["pattern"], "count": str(o["count"]), "background": scene["background"]}
    if o["pattern_color"]:
        out["pattern_color"] = o["pattern_color"]
    if scene["relation"] is None:
        out.update(single_label=o["label"], single_color=o["color"])
    else:
        b = scene["objects"][1]
        out.update(relation=scene["relation"], label2=b["label"], color2=b["color"], pattern2=b["pattern"])
        if b["pattern_color"]:
            out["pattern_color2"] = b["pattern_color"]
    return out
