"""The product silhouettes: a canvas in the item's unit box and one drawing function per subcategory.

Lives here: ``_Canvas`` (body shapes go to the silhouette mask, overlay shapes are queued in named tones)
and ``_draw_<kind>`` for tops, bottoms, dresses, sneakers, boots, heels, handbags, backpacks, totes, hats,
caps and scarves, dispatched by subcategory through ``_DRAW``.

Not here: textures, patterns, light, background and the final image (``render``); which details a product
has (``attributes``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw


class _Canvas:
    """Draws an item in unit coordinates of its bounding box.

    Body shapes go to the silhouette mask (filled later with the material texture and pattern); overlay
    shapes are queued and drawn on the composited image in a named tone ('dark', 'inner', 'accent', ...).
    """

    def __init__(self, size: int, box: tuple[float, float, float, float], mask: Image.Image) -> None:
        self.size = size
        self.x0, self.y0, self.w, self.h = box
        self.md = ImageDraw.Draw(mask)
        self.lw = max(1, round(size * 0.016))  # ~1 px after the 2x downsample at 64 px
        self.ops: list[Callable[[ImageDraw.ImageDraw, dict[str, tuple[int, int, int]]], None]] = []

    def p(self, u: float, v: float) -> tuple[float, float]:
        return (self.x0 + u * self.w, self.y0 + v * self.h)

    def ps(self, pts: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        return [self.p(u, v) for u, v in pts]

    def bb(self, u0: float, v0: float, u1: float, v1: float) -> list[float]:
        (x0, y0), (x1, y1) = self.p(u0, v0), self.p(u1, v1)
        return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]

    def px(self, t: float) -> int:
        """A length given as a fraction of the box's larger side, in pixels (>= 1)."""
        return max(1, round(t * max(self.w, self.h)))

    # --- body (textured) ---
    def poly(self, pts: Sequence[tuple[float, float]]) -> None:
        self.md.polygon(self.ps(pts), fill=255)

    def ellipse(self, u0: float, v0: float, u1: float, v1: float) -> None:
        self.md.ellipse(self.bb(u0, v0, u1, v1), fill=255)

    def rect(self, u0: float, v0: float, u1: float, v1: float, r: float = 0.0) -> None:
        b = self.bb(u0, v0, u1, v1)
        if r > 0:
            self.md.rounded_rectangle(b, radius=self.px(r), fill=255)
        else:
            self.md.rectangle(b, fill=255)

    def chord(self, box: tuple[float, float, float, float], start: float, end: float) -> None:
        self.md.chord(self.bb(*box), start, end, fill=255)

    def band(self, pts: Sequence[tuple[float, float]], width: float) -> None:
        self.md.line(self.ps(pts), fill=255, width=self.px(width), joint="curve")

    def arc(self, box: tuple[float, float, float, float], start: float, end: float, width: float) -> None:
        self.md.arc(self.bb(*box), start, end, fill=255, width=self.px(width))

    # --- overlay (queued) ---
    def f_poly(self, pts: Sequence[tuple[float, float]], tone: str, outline: str | None = None) -> None:
        xy = self.ps(pts)
        lw = self.lw
        self.ops.append(lambda d, t: d.polygon(xy, fill=t[tone], outline=t[outline] if outline else None,
                                               width=lw))

    def f_ellipse(self, box: tuple[float, float, float, float], tone: str, outline: str | None = None) -> None:
        b = self.bb(*box)
        lw = self.lw
        self.ops.append(lambda d, t: d.ellipse(b, fill=t[tone], outline=t[outline] if outline else None,
                                               width=lw))

    def f_rect(self, box: tuple[float, float, float, float], tone: str, outline: str | None = None,
               r: float = 0.0) -> None:
        b = self.bb(*box)
        rad = self.px(r) if r > 0 else 0
        lw = self.lw
        self.ops.append(lambda d, t: d.rounded_rectangle(b, radius=rad, fill=t[tone],
                                                         outline=t[outline] if outline else None, width=lw))

    def f_chord(self, box: tuple[float, float, float, float], start: float, end: float, tone: str) -> None:
        b = self.bb(*box)
        self.ops.append(lambda d, t: d.chord(b, start, end, fill=t[tone]))

    def line(self, pts: Sequence[tuple[float, float]], tone: str, width: float = 1.0) -> None:
        xy = self.ps(pts)
        w = max(1, round(self.lw * width))
        self.ops.append(lambda d, t: d.line(xy, fill=t[tone], width=w, joint="curve"))

    def dot(self, u: float, v: float, r: float, tone: str) -> None:
        x, y = self.p(u, v)
        rr = max(1.0, r * max(self.w, self.h))
        self.ops.append(lambda d, t: d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=t[tone]))

    def motif(self, u: float, v: float, r: float, kind: int) -> None:
        """A small printed motif (circle, star-ish diamond, or bars) in the accent color."""
        if kind == 0:
            self.f_ellipse((u - r, v - r * self.w / self.h, u + r, v + r * self.w / self.h), "accent", "accent_edge")
        elif kind == 1:
            k = self.w / self.h
            self.f_poly([(u, v - 1.2 * r * k), (u + r, v), (u, v + 1.2 * r * k), (u - r, v)], "accent", "accent_edge")
        else:
            k = self.w / self.h
            for i in range(3):
                vv = v + (i - 1) * 0.9 * r * k
                self.f_rect((u - r, vv - 0.3 * r * k, u + r, vv + 0.3 * r * k), "accent")


def _draw_top(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    """T-shirts, shirts, sweaters, jackets and coats: a flat-lay upper body garment.

    Drawn in four steps, in this order (later overlays paint over earlier ones): body and sleeves,
    neckline and collar, closures, then belt / pockets / print / hem trims.
    """
    bw = {"t-shirts": 0.25, "shirts": 0.24, "sweaters": 0.26, "jackets": 0.28, "coats": 0.26}[sub]
    hem = {"jackets": 0.9, "coats": 1.0}.get(sub, 0.97)
    flare = 0.05 if sub == "coats" else 0.0
    nw, nv, sv = 0.1, 0.08, 0.15  # neck half-width, neck v, shoulder v
    L, R = 0.5 - bw, 0.5 + bw
    _top_body(c, d, bw, hem, flare, nw, nv, sv)
    _top_neckline(c, d, nw, nv)
    _top_closures(c, d, sub, nv, hem)
    _top_trims(c, d, sub, rng, bw, hem, flare, L, R)


def _top_body(c: _Canvas, d: set[str], bw: float, hem: float, flare: float, nw: float, nv: float,
              sv: float) -> None:
    """The torso (hood and turtleneck behind it) and the sleeves with their seams."""
    L, R = 0.5 - bw, 0.5 + bw
    if "hood" in d:
        c.ellipse(0.5 - 0.17, 0.0, 0.5 + 0.17, 0.24)
    if "turtleneck" in d:
        c.rect(0.5 - nw, 0.01, 0.5 + nw, nv + 0.03)
    c.poly([(0.5 - nw, nv), (L, sv), (L - flare, hem), (R + flare, hem), (R, sv), (0.5 + nw, nv)])
    long = "long sleeves" in d
    for s in (-1, 1):
        sx = 0.5 + s * bw
        if long:
            c.poly([(sx, sv), (sx + s * 0.23, 0.86), (sx + s * 0.12, 0.89), (sx, 0.42)])
            c.line([(sx + s * 0.22, 0.8), (sx + s * 0.11, 0.83)], "dark")  # cuff seam
        elif "short sleeves" in d:
            c.poly([(sx, sv), (sx + s * 0.2, 0.37), (sx + s * 0.12, 0.46), (sx, 0.38)])
        c.line([(sx, sv + 0.02), (sx, 0.38)], "dark", 0.7)  # armhole seam: separates sleeve from body


def _top_neckline(c: _Canvas, d: set[str], nw: float, nv: float) -> None:
    """Hood opening, turtleneck ribs, V, lapels or round neck; then lapel and collar overlays."""
    if "hood" in d:
        c.f_ellipse((0.5 - 0.11, 0.04, 0.5 + 0.11, 0.2), "inner")
    elif "turtleneck" in d:
        c.f_ellipse((0.5 - nw, 0.0, 0.5 + nw, 0.05), "inner")
        for i in range(1, 6):
            x = 0.5 - nw + i * 2 * nw / 6
            c.line([(x, 0.03), (x, nv + 0.02)], "dark", 0.6)
    elif "v-neck" in d:
        c.f_poly([(0.5 - nw, nv), (0.5, nv + 0.16), (0.5 + nw, nv)], "inner")
    elif "lapels" in d:
        c.f_poly([(0.5 - nw, nv), (0.5, 0.4), (0.5 + nw, nv)], "inner")
    else:
        c.f_chord((0.5 - nw, nv - 0.06, 0.5 + nw, nv + 0.07), 0, 180, "inner")
    if "lapels" in d:
        for s in (-1, 1):
            c.f_poly([(0.5 + s * nw, nv), (0.5 + s * 0.01, 0.42), (0.5 + s * 0.12, 0.3), (0.5 + s * (nw + 0.06), 0.14)],
                     "shade", "dark")
    if "point collar" in d:
        for s in (-1, 1):
            c.f_poly([(0.5 + s * (nw + 0.02), nv - 0.01), (0.5, nv + 0.07), (0.5 + s * 0.05, nv + 0.14),
                      (0.5 + s * (nw + 0.05), nv + 0.07)], "light", "dark")


def _top_closures(c: _Canvas, d: set[str], sub: str, nv: float, hem: float) -> None:
    """A zip or a button placket from below the neckline down to the hem."""
    top = nv + 0.1 if "point collar" in d else nv + (0.17 if "v-neck" in d else 0.07)
    if "lapels" in d:
        top = 0.42
    if "zip front" in d:
        c.line([(0.5, top), (0.5, hem)], "metal", 1.3)
        c.f_rect((0.49, top, 0.525, top + 0.06), "metal")
    elif "button front" in d:
        c.line([(0.5, top), (0.5, hem)], "dark", 0.8)
        cols = (0.45, 0.55) if sub == "coats" else (0.5,)
        n = 4 if sub == "coats" else 5
        for i in range(n):
            v = top + 0.04 + i * (hem - top - 0.1) / max(1, n - 1)
            for u in cols:
                c.dot(u, v, 0.022, "button")


def _top_trims(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator, bw: float, hem: float,
               flare: float, L: float, R: float) -> None:
    """Belt, pockets, graphic print, ribbed hem and the jacket's waistband seam."""
    if "belt" in d:
        c.f_rect((L - flare * 0.5, 0.52, R + flare * 0.5, 0.58), "belt")
        c.f_rect((0.46, 0.51, 0.54, 0.59), "metal")
    if "chest pocket" in d:
        c.f_rect((L + 0.05, 0.27, L + 0.17, 0.39), "shade", "dark")
    if "flap pockets" in d:
        for u0 in (L + 0.04, R - 0.18):
            c.f_rect((u0, 0.66, u0 + 0.14, 0.74), "shade", "dark")
            c.line([(u0, 0.66), (u0 + 0.14, 0.66)], "dark", 1.3)
    if "graphic print" in d:
        c.motif(0.5, 0.45, 0.1, int(rng.integers(3)))
    if "ribbed hem" in d:
        c.f_rect((L, hem - 0.07, R, hem), "shade")
        for i in range(1, 12):
            x = L + i * 2 * bw / 12
            c.line([(x, hem - 0.07), (x, hem)], "dark", 0.5)
    if sub == "jackets":
        c.line([(L, hem - 0.06), (R, hem - 0.06)], "dark")  # waistband seam


def _draw_bottoms(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    """Trousers, shorts and skirts: waistband + legs / skirt panel."""
    if sub == "skirts":
        wb = 0.09
        c.rect(0.2, 0.0, 0.8, wb)
        if "pencil" in d:
            c.poly([(0.2, wb), (0.14, 0.5), (0.18, 1.0), (0.82, 1.0), (0.86, 0.5), (0.8, wb)])
        elif "pleated" in d:
            hem = [(0.0, 0.97)] + [(i / 10, 0.97 + 0.03 * (i % 2)) for i in range(1, 10)] + [(1.0, 0.97)]
            c.poly([(0.2, wb)] + hem + [(0.8, wb)])
            for i in range(1, 10):
                c.line([(0.2 + i * 0.06, wb), (i / 10, 0.97)], "dark", 0.6)
        else:
            c.poly([(0.2, wb), (0.02, 1.0), (0.98, 1.0), (0.8, wb)])
        waist = (0.2, 0.8)
        if "button front" in d:
            c.line([(0.5, wb), (0.5, 0.95)], "dark", 0.7)
            for i in range(5):
                c.dot(0.5, wb + 0.06 + i * 0.17, 0.02, "button")
    else:
        wb = 0.07 if sub == "trousers" else 0.12
        c.rect(0.08, 0.0, 0.92, wb)
        if sub == "shorts":
            o = 0.02 if "wide leg" in d else 0.1  # hem flare
            c.poly([(0.08, wb), (o, 1.0), (0.47, 1.0), (0.5, 0.6), (0.53, 1.0), (1 - o, 1.0), (0.92, wb)])
            crotch = 0.6
        elif "wide leg" in d:
            c.poly([(0.08, wb), (0.0, 1.0), (0.46, 1.0), (0.5, 0.32), (0.54, 1.0), (1.0, 1.0), (0.92, wb)])
            crotch = 0.32
        else:
            c.poly([(0.08, wb), (0.13, 1.0), (0.43, 1.0), (0.5, 0.3), (0.57, 1.0), (0.87, 1.0), (0.92, wb)])
            crotch = 0.3
        waist = (0.08, 0.92)
        c.line([(0.5, wb), (0.5, crotch * 0.8 + wb * 0.2)], "dark", 0.8)  # fly
        if "side pockets" in d:
            c.line([(0.1, wb + 0.02), (0.24, wb + 0.02), (0.14, wb + (0.2 if sub == "trousers" else 0.3))], "dark")
            c.line([(0.9, wb + 0.02), (0.76, wb + 0.02), (0.86, wb + (0.2 if sub == "trousers" else 0.3))], "dark")
        if "cuffs" in d:
            cv = 0.94 if sub == "trousers" else 0.86
            if sub == "shorts":
                o = 0.02 if "wide leg" in d else 0.1
                legs = ((o, 0.47), (0.53, 1 - o))
            elif "wide leg" in d:
                legs = ((0.0, 0.46), (0.54, 1.0))
            else:
                legs = ((0.13, 0.43), (0.57, 0.87))
            for a, b in legs:
                c.f_rect((a, cv, b, 1.0), "shade")
                c.line([(a, cv), (b, cv)], "dark", 1.2)
    c.line([(waist[0], wb), (waist[1], wb)], "dark", 0.8)
    if "belt" in d:
        c.f_rect((waist[0] - 0.01, wb * 0.2, waist[1] + 0.01, wb * 0.85), "belt")
        c.f_rect((0.45, 0.0, 0.55, wb), "metal")
        c.f_rect((0.475, wb * 0.3, 0.525, wb * 0.7), "belt")
    else:
        for u in (0.25, 0.5, 0.75):  # belt loops
            c.line([(u, 0.0), (u, wb)], "dark", 0.6)


def _draw_dress(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    waist = 0.36 if sub == "mini dresses" else 0.27
    c.poly([(0.38, 0.04), (0.3, 0.07), (0.33, waist), (0.67, waist), (0.7, 0.07), (0.62, 0.04)])
    if sub == "mini dresses":
        c.poly([(0.33, waist), (0.08, 1.0), (0.92, 1.0), (0.67, waist)])
    else:
        c.poly([(0.33, waist), (0.22, 0.6), (0.08, 1.0), (0.92, 1.0), (0.78, 0.6), (0.67, waist)])
    sl = 0.22 if sub == "mini dresses" else 0.16
    for s in (-1, 1):
        sx = 0.5 + s * 0.2
        if "long sleeves" in d:
            c.poly([(sx, 0.07), (sx + s * 0.2, 0.07 + 2.4 * sl), (sx + s * 0.12, 0.08 + 2.5 * sl), (sx - s * 0.02, 0.07 + sl)])
        elif "short sleeves" in d:
            c.poly([(sx, 0.07), (sx + s * 0.15, 0.07 + 0.75 * sl), (sx + s * 0.08, 0.07 + sl), (sx - s * 0.02, 0.07 + 0.8 * sl)])
    if "v-neck" in d:
        c.f_poly([(0.39, 0.04), (0.5, 0.04 + 0.55 * waist), (0.61, 0.04)], "inner")
    else:
        c.f_chord((0.39, -0.02, 0.61, 0.04 + 0.25 * waist), 0, 180, "inner")
    if "sleeveless" in d:
        for s in (-1, 1):
            c.line([(0.5 + s * 0.19, 0.07), (0.5 + s * 0.19, 0.06 + 0.5 * waist)], "dark", 0.6)
    c.line([(0.33, waist), (0.67, waist)], "dark", 0.8)  # waist seam
    if "belt" in d:
        c.f_rect((0.32, waist - 0.025, 0.68, waist + 0.025), "belt")
        c.f_rect((0.47, waist - 0.03, 0.53, waist + 0.03), "metal")


def _draw_sneaker(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    high = "high-top" in d
    collar = 0.06 if high else 0.36
    c.poly([(0.02, 0.84), (0.03, collar + 0.06), (0.1, collar), (0.3, collar + (0.02 if high else 0.08)),
            (0.38, collar - 0.04 if high else 0.3), (0.46, 0.4 if high else 0.36), (0.75, 0.55), (0.94, 0.66),
            (1.0, 0.84)])
    c.f_rect((0.0, 0.8, 1.0, 1.0), "white", "dark", r=0.04)  # rubber sole
    c.line([(0.02, 0.88), (0.99, 0.88)], "sole_line", 0.7)
    c.line([(0.66, 0.8), (0.72, 0.6), (0.95, 0.7)], "dark", 0.8)  # toe cap
    for i in range(4):  # laces
        u = 0.4 + i * 0.07
        v = (0.42 if high else 0.38) + i * 0.045
        c.line([(u - 0.03, v - 0.03), (u + 0.04, v + 0.04)], "lace", 0.9)
        c.line([(u - 0.03, v + 0.04), (u + 0.04, v - 0.03)], "lace", 0.9)
    if "contrast stripe" in d:
        c.f_poly([(0.12, 0.74), (0.62, 0.46), (0.68, 0.52), (0.2, 0.78)], "accent")
    if high:
        c.dot(0.13, 0.4, 0.035, "dark")  # ankle patch


def _draw_boot(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    top = 0.42 if "ankle height" in d else 0.0
    heel = "block heel" in d
    sole = 0.86 if heel else 0.93
    c.poly([(0.08, sole), (0.1, top), (0.5, top), (0.52, 0.62), (0.78, 0.7), (0.97, 0.78), (0.98, sole)])
    c.f_rect((0.06, sole, 1.0, sole + 0.05), "sole")
    if heel:
        c.f_poly([(0.08, sole), (0.32, sole), (0.3, 1.0), (0.1, 1.0)], "sole")
    c.line([(0.1, top + 0.02), (0.5, top + 0.02)], "dark", 0.8)  # top edge
    if "laces" in d:
        for i in range(4):
            v = max(top, 0.42) + 0.04 + i * 0.05
            c.line([(0.4, v), (0.54, v + 0.04)], "lace", 0.9)
    else:
        c.line([(0.44, top + 0.03), (0.44, 0.72)], "dark", 0.6)  # side zip seam
    c.f_rect((0.06, top - 0.04, 0.13, top + 0.06), "shade", "dark")  # pull tab


def _draw_heel(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    pointed = "pointed toe" in d
    toe = [(1.0, 0.93)] if pointed else [(0.95, 0.78), (0.99, 0.86), (0.98, 0.95)]
    c.poly([(0.04, 0.32), (0.14, 0.36), (0.45, 0.66), (0.62, 0.62), (0.86, 0.72)] + toe
           + [(0.6, 0.96), (0.35, 0.8), (0.05, 0.58)])
    if "stiletto heel" in d:
        c.poly([(0.05, 0.55), (0.16, 0.6), (0.12, 1.0), (0.09, 1.0)])
    else:
        c.poly([(0.05, 0.55), (0.22, 0.64), (0.19, 1.0), (0.07, 1.0)])
    c.line([(0.05, 0.58), (0.35, 0.8), (0.6, 0.96), (0.96, 0.96)], "sole", 1.0)
    c.f_poly([(0.14, 0.36), (0.45, 0.66), (0.3, 0.6), (0.1, 0.42)], "inner")  # opening / insole
    if "ankle strap" in d:
        c.band([(0.06, 0.33), (0.2, 0.2), (0.34, 0.26), (0.3, 0.52)], 0.035)
        c.f_rect((0.16, 0.18, 0.24, 0.25), "metal")


def _draw_handbag(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    c.poly([(0.14, 0.4), (0.03, 1.0), (0.97, 1.0), (0.86, 0.4)])
    c.arc((0.28, 0.1, 0.72, 0.72), 180, 360, 0.06)
    if "crossbody strap" in d:
        c.band([(0.14, 0.42), (0.0, 0.0)], 0.02)
        c.band([(0.86, 0.42), (1.0, 0.0)], 0.02)
    c.f_poly([(0.13, 0.42), (0.87, 0.42), (0.9, 0.62), (0.5, 0.72), (0.1, 0.62)], "shade", "dark")
    if "buckle" in d:
        c.f_rect((0.45, 0.64, 0.55, 0.76), "metal", "dark")
    else:
        c.dot(0.5, 0.68, 0.03, "metal")


def _draw_backpack(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    c.rect(0.08, 0.12, 0.92, 1.0, r=0.2)
    c.arc((0.38, 0.02, 0.62, 0.22), 180, 360, 0.04)
    for u0 in (0.0, 0.9):  # shoulder straps behind the body
        c.f_rect((u0, 0.28, u0 + 0.1, 0.86), "dark", r=0.03)
    c.line([(0.2, 0.24), (0.5, 0.19), (0.8, 0.24)], "metal", 0.9)  # top zip
    if "front pocket" in d:
        c.f_rect((0.2, 0.55, 0.8, 0.93), "shade", "dark", r=0.08)
        c.line([(0.24, 0.6), (0.76, 0.6)], "metal", 0.9)
    else:
        c.line([(0.25, 0.55), (0.75, 0.55)], "dark", 0.7)


def _draw_tote(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    c.poly([(0.1, 0.38), (0.05, 1.0), (0.95, 1.0), (0.9, 0.38)])
    for u0 in (0.18, 0.55):
        c.arc((u0, 0.02, u0 + 0.27, 0.74), 180, 360, 0.035)
    c.line([(0.1, 0.44), (0.9, 0.44)], "dark", 0.8)
    if "graphic print" in d:
        c.motif(0.5, 0.7, 0.14, int(rng.integers(3)))


def _draw_hat(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    if "bucket shape" in d:
        c.poly([(0.31, 0.62), (0.35, 0.16), (0.65, 0.16), (0.69, 0.62)])
        c.ellipse(0.35, 0.08, 0.65, 0.26)
        c.poly([(0.31, 0.58), (0.1, 0.92), (0.9, 0.92), (0.69, 0.58)])
        band = (0.32, 0.5, 0.68, 0.6)
        c.line([(0.14, 0.86), (0.86, 0.86)], "dark", 0.6)  # brim stitching
    else:
        c.ellipse(0.0, 0.6, 1.0, 0.94)
        c.poly([(0.27, 0.74), (0.29, 0.2), (0.4, 0.1), (0.5, 0.17), (0.6, 0.1), (0.71, 0.2), (0.73, 0.74)])
        band = (0.28, 0.56, 0.72, 0.68)
        c.line([(0.5, 0.18), (0.5, 0.4)], "dark", 0.7)  # crown crease
    if "ribbon band" in d:
        c.f_rect(band, "accent")
    else:
        c.line([(band[0], band[3]), (band[2], band[3])], "dark", 0.8)


def _draw_cap(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    c.chord((0.04, 0.1, 0.72, 1.3), 180, 360)
    c.poly([(0.5, 0.62), (0.9, 0.66), (1.0, 0.76), (0.92, 0.8), (0.5, 0.74)])  # visor
    c.line([(0.38, 0.1), (0.2, 0.68)], "dark", 0.6)
    c.line([(0.38, 0.1), (0.52, 0.68)], "dark", 0.6)
    c.line([(0.04, 0.7), (0.62, 0.7)], "dark", 0.8)
    if "button top" in d:
        c.f_ellipse((0.34, 0.05, 0.42, 0.15), "shade", "dark")
    if "embroidered logo" in d:
        c.motif(0.33, 0.45, 0.08, int(rng.integers(3)))


def _draw_scarf(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    c.rect(0.12, 0.0, 0.88, 0.22, r=0.08)
    c.poly([(0.18, 0.12), (0.48, 0.12), (0.5, 0.9), (0.2, 0.9)])
    c.poly([(0.52, 0.14), (0.82, 0.14), (0.8, 0.8), (0.5, 0.8)])
    c.f_ellipse((0.3, 0.05, 0.7, 0.17), "inner")
    c.line([(0.5, 0.12), (0.51, 0.8)], "dark", 0.7)
    for a, b, v in ((0.2, 0.5, 0.9), (0.5, 0.8, 0.8)):
        if "fringe" in d:
            for i in range(7):
                u = a + 0.02 + i * (b - a - 0.04) / 6
                c.band([(u, v - 0.01), (u, v + 0.09)], 0.012)
        else:  # rolled hem: a stitched edge just above each end
            c.line([(a + 0.01, v - 0.04), (b - 0.01, v - 0.04)], "dark", 0.8)


_DRAW: dict[str, Callable[[_Canvas, set[str], str, np.random.Generator], None]] = {
    "t-shirts": _draw_top, "shirts": _draw_top, "sweaters": _draw_top, "jackets": _draw_top, "coats": _draw_top,
    "trousers": _draw_bottoms, "shorts": _draw_bottoms, "skirts": _draw_bottoms,
    "mini dresses": _draw_dress, "maxi dresses": _draw_dress,
    "sneakers": _draw_sneaker, "boots": _draw_boot, "heels": _draw_heel,
    "handbags": _draw_handbag, "backpacks": _draw_backpack, "totes": _draw_tote,
    "hats": _draw_hat, "caps": _draw_cap, "scarves": _draw_scarf,
}
