"""The silhouettes of the world's 48 object classes, drawn in unit coordinates of an object's box.

Each class has one drawing function ``f(pen)``. Body shapes go into the object's mask (later filled with its
colour and pattern); holes cut the mask (windows, a key's bow); marks are thin details drawn on top in a
darker tone of the object's colour (eyes, wheel hubs). ``u`` runs left to right and ``v`` top to bottom in
[0, 1] of the box; :class:`Pen` mirrors ``u`` for flipped objects. Layout, colour and patterns live in
``render``; the class list (aspect ratios, categories) in ``vocab``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from PIL import ImageDraw

Pt = tuple[float, float]
Box = tuple[float, float, float, float]
Mark = Callable[[ImageDraw.ImageDraw, tuple[float, float], dict[str, tuple[int, int, int]]], None]


class Pen:
    """Draws one object into ``draw`` (an "L" mask holding the box, whose top-left corner is at ``origin``).

    ``w`` x ``h`` is the box size in pixels; ``flip`` mirrors the drawing left-right. Marks are queued as
    callables ``mark(draw_rgb, offset, tones)`` so they can be drawn on the composited picture.
    """

    def __init__(self, draw: ImageDraw.ImageDraw, w: float, h: float, origin: Pt, flip: bool) -> None:
        self.d, self.w, self.h, self.flip = draw, w, h, flip
        self.ox, self.oy = origin
        self.marks: list[Mark] = []
        self.lw = max(1.0, 0.045 * max(w, h))  # mark line width: ~1 px at 64 px output for a mid-size object

    def p(self, u: float, v: float) -> Pt:
        return (self.ox + (1.0 - u if self.flip else u) * self.w, self.oy + v * self.h)

    def ps(self, pts: Sequence[Pt]) -> list[Pt]:
        return [self.p(u, v) for u, v in pts]

    def bb(self, box: Box) -> list[float]:
        (x0, y0), (x1, y1) = self.p(box[0], box[1]), self.p(box[2], box[3])
        return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]

    def px(self, t: float) -> int:
        """A length given as a fraction of the box's larger side, in whole pixels (>= 1)."""
        return max(1, round(t * max(self.w, self.h)))

    def angles(self, start: float, end: float) -> tuple[float, float]:
        """PIL arc angles (clockwise from 3 o'clock) after the left-right mirror."""
        return (180.0 - end, 180.0 - start) if self.flip else (start, end)

    # --- body and holes (mask) ---
    def poly(self, pts: Sequence[Pt], hole: bool = False) -> None:
        self.d.polygon(self.ps(pts), fill=0 if hole else 255)

    def ellipse(self, u0: float, v0: float, u1: float, v1: float, hole: bool = False) -> None:
        self.d.ellipse(self.bb((u0, v0, u1, v1)), fill=0 if hole else 255)

    def rect(self, u0: float, v0: float, u1: float, v1: float, r: float = 0.0, hole: bool = False) -> None:
        self.d.rounded_rectangle(self.bb((u0, v0, u1, v1)), radius=self.px(r) if r > 0 else 0,
                                 fill=0 if hole else 255)

    def chord(self, box: Box, start: float, end: float) -> None:
        self.d.chord(self.bb(box), *self.angles(start, end), fill=255)

    def band(self, pts: Sequence[Pt], width: float) -> None:
        self.d.line(self.ps(pts), fill=255, width=self.px(width), joint="curve")

    def arc(self, box: Box, start: float, end: float, width: float) -> None:
        self.d.arc(self.bb(box), *self.angles(start, end), fill=255, width=self.px(width))

    def ring(self, box: Box, width: float) -> None:
        self.d.ellipse(self.bb(box), outline=255, width=self.px(width))

    # --- marks (drawn later on the picture, in a tone of the object's colour) ---
    def mark_line(self, pts: Sequence[Pt], tone: str = "dark") -> None:
        xy, w = self.ps(pts), max(1, round(self.lw))
        self.marks.append(lambda d, o, t: d.line([(x + o[0], y + o[1]) for x, y in xy], fill=t[tone], width=w))

    def mark_dot(self, u: float, v: float, r: float, tone: str = "dark") -> None:
        (x, y), rr = self.p(u, v), max(1.0, r * max(self.w, self.h))
        self.marks.append(lambda d, o, t: d.ellipse([x + o[0] - rr, y + o[1] - rr, x + o[0] + rr, y + o[1] + rr],
                                                    fill=t[tone]))


# ============================================================================================ animals

def fish(p: Pen) -> None:
    p.ellipse(0.0, 0.18, 0.74, 0.82)
    p.poly([(0.64, 0.5), (1.0, 0.12), (0.93, 0.5), (1.0, 0.88)])
    p.poly([(0.28, 0.22), (0.44, 0.02), (0.54, 0.24)])
    p.mark_dot(0.16, 0.42, 0.035)
    p.mark_line([(0.3, 0.28), (0.26, 0.5), (0.3, 0.72)])


def bird(p: Pen) -> None:
    p.ellipse(0.12, 0.38, 0.78, 0.85)
    p.ellipse(0.58, 0.12, 0.9, 0.52)
    p.poly([(0.87, 0.27), (1.0, 0.35), (0.87, 0.42)])
    p.poly([(0.2, 0.52), (0.0, 0.36), (0.0, 0.62), (0.22, 0.7)])
    p.band([(0.45, 0.82), (0.42, 1.0)], 0.035)
    p.band([(0.56, 0.82), (0.59, 1.0)], 0.035)
    p.mark_dot(0.77, 0.28, 0.03)
    p.mark_line([(0.28, 0.55), (0.48, 0.7), (0.64, 0.56)])


def butterfly(p: Pen) -> None:
    p.ellipse(0.0, 0.0, 0.48, 0.56)
    p.ellipse(0.52, 0.0, 1.0, 0.56)
    p.ellipse(0.08, 0.46, 0.48, 0.96)
    p.ellipse(0.52, 0.46, 0.92, 0.96)
    p.rect(0.455, 0.12, 0.545, 0.94, r=0.03)
    p.band([(0.48, 0.14), (0.4, 0.0)], 0.02)
    p.band([(0.52, 0.14), (0.6, 0.0)], 0.02)
    p.mark_line([(0.5, 0.1), (0.5, 0.92)])
    for u in (0.22, 0.78):
        p.mark_dot(u, 0.28, 0.05)


def snail(p: Pen) -> None:
    p.ellipse(0.32, 0.0, 0.88, 0.74)
    p.rect(0.0, 0.66, 1.0, 0.9, r=0.1)
    p.ellipse(0.0, 0.42, 0.2, 0.86)
    p.band([(0.06, 0.5), (0.02, 0.16)], 0.035)
    p.band([(0.14, 0.5), (0.18, 0.18)], 0.035)
    p.mark_line([(0.6, 0.37), (0.7, 0.3), (0.76, 0.42), (0.66, 0.58), (0.48, 0.52), (0.46, 0.28), (0.6, 0.12)])


def turtle(p: Pen) -> None:
    p.chord((0.12, 0.05, 0.86, 1.15), 180, 360)
    p.ellipse(0.8, 0.36, 1.0, 0.62)
    p.rect(0.2, 0.52, 0.34, 0.86, r=0.04)
    p.rect(0.62, 0.52, 0.76, 0.86, r=0.04)
    p.poly([(0.14, 0.52), (0.0, 0.64), (0.16, 0.6)])
    p.mark_line([(0.26, 0.58), (0.36, 0.3), (0.62, 0.3), (0.72, 0.58)])
    p.mark_line([(0.36, 0.3), (0.42, 0.1)])
    p.mark_line([(0.62, 0.3), (0.56, 0.1)])


def rabbit(p: Pen) -> None:
    p.ellipse(0.1, 0.48, 0.9, 1.0)
    p.ellipse(0.24, 0.2, 0.76, 0.62)
    p.ellipse(0.28, 0.0, 0.44, 0.36)
    p.ellipse(0.56, 0.0, 0.72, 0.36)
    p.mark_dot(0.4, 0.38, 0.03)
    p.mark_dot(0.6, 0.38, 0.03)


def snake(p: Pen) -> None:
    pts = [(0.04 + 0.78 * t, 0.52 + 0.3 * math.sin(2.5 * math.pi * t)) for t in (i / 16 for i in range(17))]
    p.band(pts, 0.1)
    eu, ev = pts[-1]
    p.ellipse(eu - 0.06, ev - 0.14, eu + 0.16, ev + 0.12)
    p.mark_dot(eu + 0.08, ev - 0.04, 0.025)


# ============================================================================================ vehicles

def car(p: Pen) -> None:
    p.rect(0.0, 0.42, 1.0, 0.8, r=0.06)
    p.poly([(0.18, 0.44), (0.32, 0.08), (0.7, 0.08), (0.84, 0.44)])
    p.poly([(0.35, 0.16), (0.49, 0.16), (0.49, 0.4), (0.27, 0.4)], hole=True)
    p.poly([(0.53, 0.16), (0.67, 0.16), (0.76, 0.4), (0.53, 0.4)], hole=True)
    p.ellipse(0.1, 0.58, 0.32, 1.0)
    p.ellipse(0.68, 0.58, 0.9, 1.0)
    p.mark_dot(0.21, 0.79, 0.035)
    p.mark_dot(0.79, 0.79, 0.035)


def truck(p: Pen) -> None:
    p.rect(0.0, 0.0, 0.64, 0.78)
    p.poly([(0.62, 0.22), (0.88, 0.22), (1.0, 0.5), (1.0, 0.78), (0.62, 0.78)])
    p.poly([(0.72, 0.3), (0.86, 0.3), (0.94, 0.5), (0.72, 0.5)], hole=True)
    for u in (0.06, 0.34, 0.74):
        p.ellipse(u, 0.62, u + 0.2, 1.0)
        p.mark_dot(u + 0.1, 0.81, 0.03)


def bus(p: Pen) -> None:
    p.rect(0.0, 0.04, 1.0, 0.82, r=0.06)
    for i in range(5):
        u0 = 0.05 + i * 0.18
        p.rect(u0, 0.14, u0 + 0.13, 0.42, hole=True)
    p.ellipse(0.1, 0.66, 0.26, 1.0)
    p.ellipse(0.72, 0.66, 0.88, 1.0)
    p.mark_line([(0.96, 0.46), (0.96, 0.78)])


def bicycle(p: Pen) -> None:
    p.ring((0.0, 0.38, 0.38, 1.0), 0.045)
    p.ring((0.62, 0.38, 1.0, 1.0), 0.045)
    p.band([(0.19, 0.69), (0.45, 0.69), (0.66, 0.36), (0.34, 0.36), (0.19, 0.69)], 0.04)
    p.band([(0.45, 0.69), (0.31, 0.2)], 0.04)
    p.band([(0.81, 0.69), (0.64, 0.16)], 0.04)
    p.rect(0.22, 0.12, 0.4, 0.21, r=0.02)
    p.band([(0.58, 0.16), (0.74, 0.12)], 0.04)


def sailboat(p: Pen) -> None:
    p.poly([(0.0, 0.7), (1.0, 0.7), (0.84, 0.98), (0.14, 0.98)])
    p.poly([(0.5, 0.02), (0.5, 0.64), (0.08, 0.64)])
    p.poly([(0.5, 0.12), (0.5, 0.64), (0.86, 0.64)])
    p.band([(0.5, 0.0), (0.5, 0.72)], 0.03)


def airplane(p: Pen) -> None:
    p.ellipse(0.0, 0.36, 1.0, 0.62)
    p.poly([(0.02, 0.48), (0.0, 0.04), (0.1, 0.04), (0.24, 0.42)])
    p.poly([(0.38, 0.5), (0.62, 0.5), (0.44, 0.98), (0.34, 0.98)])
    for u in (0.5, 0.6, 0.7, 0.8):
        p.mark_dot(u, 0.45, 0.015)


def rocket(p: Pen) -> None:
    p.poly([(0.5, 0.0), (0.78, 0.24), (0.78, 0.8), (0.22, 0.8), (0.22, 0.24)])
    p.poly([(0.22, 0.5), (0.0, 0.82), (0.0, 0.96), (0.22, 0.8)])
    p.poly([(0.78, 0.5), (1.0, 0.82), (1.0, 0.96), (0.78, 0.8)])
    p.rect(0.34, 0.8, 0.66, 0.92)
    p.ellipse(0.37, 0.3, 0.63, 0.43, hole=True)


# ============================================================================================ tools

def hammer(p: Pen) -> None:
    p.rect(0.42, 0.22, 0.58, 1.0, r=0.04)
    p.rect(0.06, 0.04, 0.7, 0.3)
    p.poly([(0.7, 0.06), (0.98, 0.0), (0.9, 0.18), (0.7, 0.28)])


def key(p: Pen) -> None:
    p.ellipse(0.0, 0.06, 0.36, 0.94)
    p.ellipse(0.09, 0.3, 0.27, 0.7, hole=True)
    p.rect(0.33, 0.4, 1.0, 0.6)
    p.rect(0.68, 0.58, 0.76, 0.84)
    p.rect(0.84, 0.58, 0.92, 0.92)


def wrench(p: Pen) -> None:
    p.band([(0.2, 0.5), (0.84, 0.5)], 0.085)
    p.ellipse(0.0, 0.1, 0.3, 0.9)
    p.poly([(0.0, 0.36), (0.16, 0.4), (0.16, 0.6), (0.0, 0.64)], hole=True)
    p.ellipse(0.76, 0.2, 1.0, 0.8)
    p.ellipse(0.83, 0.38, 0.93, 0.62, hole=True)


def axe(p: Pen) -> None:
    p.band([(0.6, 0.02), (0.64, 1.0)], 0.09)
    p.poly([(0.64, 0.06), (0.22, 0.0), (0.06, 0.02), (0.0, 0.24), (0.06, 0.46), (0.22, 0.44), (0.64, 0.32)])


def shovel(p: Pen) -> None:
    p.rect(0.42, 0.08, 0.58, 0.56)
    p.rect(0.2, 0.0, 0.8, 0.09, r=0.03)
    p.poly([(0.08, 0.54), (0.92, 0.54), (0.92, 0.8), (0.5, 1.0), (0.08, 0.8)])


# ============================================================================================ food

def apple(p: Pen) -> None:
    p.ellipse(0.02, 0.16, 0.58, 0.98)
    p.ellipse(0.42, 0.16, 0.98, 0.98)
    p.band([(0.5, 0.24), (0.56, 0.0)], 0.05)
    p.ellipse(0.53, 0.02, 0.8, 0.16)


def banana(p: Pen) -> None:
    p.arc((0.0, -1.1, 1.0, 0.95), 25, 155, 0.14)
    p.mark_line([(0.12, 0.5), (0.3, 0.72), (0.5, 0.78), (0.7, 0.72), (0.88, 0.5)])


def carrot(p: Pen) -> None:
    p.poly([(0.1, 0.26), (0.9, 0.26), (0.56, 0.98), (0.44, 0.98)])
    p.ellipse(0.18, 0.0, 0.44, 0.32)
    p.ellipse(0.38, 0.0, 0.62, 0.3)
    p.ellipse(0.56, 0.0, 0.82, 0.32)
    for v in (0.45, 0.62, 0.78):
        p.mark_line([(0.5 - 0.25 * (1 - v), v), (0.5, v + 0.02)])


def mushroom(p: Pen) -> None:
    p.chord((0.0, 0.0, 1.0, 1.1), 180, 360)
    p.rect(0.32, 0.5, 0.68, 1.0, r=0.08)
    p.mark_line([(0.06, 0.55), (0.94, 0.55)])
    p.mark_dot(0.32, 0.26, 0.05)
    p.mark_dot(0.64, 0.2, 0.04)


def ice_cream(p: Pen) -> None:
    p.poly([(0.14, 0.44), (0.86, 0.44), (0.5, 1.0)])
    p.ellipse(0.04, 0.0, 0.96, 0.56)
    p.mark_line([(0.3, 0.56), (0.6, 0.86)])
    p.mark_line([(0.7, 0.56), (0.4, 0.86)])
    p.mark_line([(0.1, 0.46), (0.9, 0.46)])


def cherry(p: Pen) -> None:
    p.ellipse(0.0, 0.52, 0.44, 0.96)
    p.ellipse(0.5, 0.56, 0.94, 1.0)
    p.band([(0.22, 0.56), (0.5, 0.06)], 0.035)
    p.band([(0.72, 0.6), (0.5, 0.06)], 0.035)
    p.ellipse(0.5, 0.0, 0.82, 0.14)


def pizza_slice(p: Pen) -> None:
    p.poly([(0.0, 0.1), (1.0, 0.1), (0.5, 1.0)])
    p.rect(0.0, 0.0, 1.0, 0.14, r=0.05)
    p.mark_line([(0.04, 0.15), (0.96, 0.15)])
    for u, v in ((0.35, 0.3), (0.62, 0.36), (0.48, 0.58)):
        p.mark_dot(u, v, 0.06)


# ============================================================================================ furniture

def chair(p: Pen) -> None:
    p.rect(0.0, 0.0, 0.14, 1.0)
    p.rect(0.0, 0.5, 1.0, 0.62)
    p.rect(0.86, 0.62, 1.0, 1.0)
    p.rect(0.0, 0.04, 0.32, 0.14)


def table(p: Pen) -> None:
    p.rect(0.0, 0.06, 1.0, 0.22, r=0.02)
    p.rect(0.06, 0.22, 0.15, 1.0)
    p.rect(0.85, 0.22, 0.94, 1.0)


def lamp(p: Pen) -> None:
    p.poly([(0.22, 0.0), (0.78, 0.0), (1.0, 0.46), (0.0, 0.46)])
    p.rect(0.44, 0.46, 0.56, 0.9)
    p.ellipse(0.18, 0.86, 0.82, 1.0)


def bed(p: Pen) -> None:
    p.rect(0.0, 0.0, 0.1, 1.0, r=0.02)
    p.rect(0.0, 0.46, 1.0, 0.78)
    p.rect(0.92, 0.3, 1.0, 1.0)
    p.ellipse(0.12, 0.28, 0.32, 0.5)
    p.mark_line([(0.4, 0.48), (0.4, 0.76)])


def sofa(p: Pen) -> None:
    p.rect(0.08, 0.08, 0.92, 0.56, r=0.06)
    p.rect(0.0, 0.46, 1.0, 0.86, r=0.05)
    p.rect(0.0, 0.3, 0.12, 0.86, r=0.05)
    p.rect(0.88, 0.3, 1.0, 0.86, r=0.05)
    p.rect(0.06, 0.86, 0.12, 1.0)
    p.rect(0.88, 0.86, 0.94, 1.0)
    p.mark_line([(0.5, 0.12), (0.5, 0.5)])


def shelf(p: Pen) -> None:
    p.rect(0.0, 0.0, 1.0, 1.0)
    for v0 in (0.05, 0.375, 0.7):
        p.rect(0.1, v0, 0.9, v0 + 0.25, hole=True)


# ============================================================================================ symbols

def stop_sign(p: Pen) -> None:
    p.poly([(0.5 + 0.5 * math.cos(a), 0.275 + 0.275 * math.sin(a))
            for a in (math.pi / 8 + k * math.pi / 4 for k in range(8))])
    p.rect(0.44, 0.52, 0.56, 1.0)
    p.mark_line([(0.22, 0.275), (0.78, 0.275)], "light")


def arrow(p: Pen) -> None:
    p.rect(0.0, 0.36, 0.6, 0.64)
    p.poly([(0.52, 0.0), (1.0, 0.5), (0.52, 1.0)])


def star(p: Pen) -> None:
    pts = []
    for k in range(10):
        a = -math.pi / 2 + k * math.pi / 5
        r = 0.5 if k % 2 == 0 else 0.2
        pts.append((0.5 + r * math.cos(a), 0.53 + r * math.sin(a)))
    p.poly(pts)


def heart(p: Pen) -> None:
    p.ellipse(0.0, 0.0, 0.54, 0.56)
    p.ellipse(0.46, 0.0, 1.0, 0.56)
    p.poly([(0.03, 0.38), (0.97, 0.38), (0.5, 1.0)])


def moon(p: Pen) -> None:
    p.ellipse(0.0, 0.0, 1.0, 1.0)
    p.ellipse(0.38, -0.06, 1.4, 0.94, hole=True)


def lightning_bolt(p: Pen) -> None:
    p.poly([(0.55, 0.0), (0.05, 0.56), (0.45, 0.56), (0.3, 1.0), (0.95, 0.38), (0.55, 0.38), (0.8, 0.0)])


def cross(p: Pen) -> None:
    p.rect(0.34, 0.0, 0.66, 1.0)
    p.rect(0.0, 0.34, 1.0, 0.66)


# ============================================================================================ household things

def cup(p: Pen) -> None:
    p.poly([(0.0, 0.04), (0.74, 0.04), (0.66, 1.0), (0.08, 1.0)])
    p.arc((0.4, 0.2, 1.0, 0.78), 270, 90, 0.09)


def bottle(p: Pen) -> None:
    p.rect(0.0, 0.4, 1.0, 1.0, r=0.1)
    p.ellipse(0.0, 0.26, 1.0, 0.54)
    p.rect(0.3, 0.04, 0.7, 0.34)
    p.rect(0.26, 0.0, 0.74, 0.08)
    p.mark_line([(0.1, 0.6), (0.9, 0.6)])
    p.mark_line([(0.1, 0.82), (0.9, 0.82)])


def umbrella(p: Pen) -> None:
    p.chord((0.0, 0.0, 1.0, 1.0), 180, 360)
    for u0 in (0.0, 0.333, 0.666):
        p.ellipse(u0, 0.43, u0 + 0.334, 0.57, hole=True)
    p.band([(0.5, 0.3), (0.5, 0.88)], 0.045)
    p.arc((0.5, 0.76, 0.74, 1.0), 0, 180, 0.045)


def bell(p: Pen) -> None:
    p.chord((0.14, 0.08, 0.86, 0.6), 180, 360)
    p.poly([(0.14, 0.34), (0.86, 0.34), (0.92, 0.72), (1.0, 0.84), (0.0, 0.84), (0.08, 0.72)])
    p.ellipse(0.4, 0.78, 0.6, 1.0)
    p.ring((0.42, 0.0, 0.58, 0.14), 0.03)


def clock(p: Pen) -> None:
    p.ellipse(0.06, 0.12, 0.94, 0.96)
    p.ellipse(0.18, 0.25, 0.82, 0.83, hole=True)
    p.ellipse(0.02, 0.0, 0.3, 0.24)
    p.ellipse(0.7, 0.0, 0.98, 0.24)
    p.band([(0.22, 0.9), (0.12, 1.0)], 0.05)
    p.band([(0.78, 0.9), (0.88, 1.0)], 0.05)
    p.band([(0.5, 0.56), (0.5, 0.2)], 0.045)  # the minute hand reaches the rim: one connected shape
    p.band([(0.5, 0.56), (0.66, 0.62)], 0.045)


# ============================================================================================ scenery

def house(p: Pen) -> None:
    p.rect(0.12, 0.46, 0.88, 1.0)
    p.poly([(0.0, 0.5), (0.5, 0.02), (1.0, 0.5)])
    p.rect(0.68, 0.08, 0.8, 0.36)
    p.rect(0.42, 0.7, 0.58, 1.0, hole=True)
    p.rect(0.2, 0.58, 0.34, 0.72, hole=True)
    p.rect(0.66, 0.58, 0.8, 0.72, hole=True)


def tree(p: Pen) -> None:
    p.rect(0.4, 0.56, 0.6, 1.0)
    p.ellipse(0.0, 0.22, 0.6, 0.74)
    p.ellipse(0.4, 0.22, 1.0, 0.74)
    p.ellipse(0.16, 0.0, 0.84, 0.56)


def flower(p: Pen) -> None:
    p.band([(0.5, 0.4), (0.5, 1.0)], 0.06)
    p.ellipse(0.5, 0.62, 0.9, 0.76)
    p.ellipse(0.1, 0.72, 0.5, 0.86)
    for k in range(6):
        a = k * math.pi / 3
        cu, cv = 0.5 + 0.217 * math.cos(a), 0.24 + 0.13 * math.sin(a)
        p.ellipse(cu - 0.167, cv - 0.1, cu + 0.167, cv + 0.1)
    p.mark_dot(0.5, 0.24, 0.06)


def cloud(p: Pen) -> None:
    p.ellipse(0.0, 0.38, 0.38, 1.0)
    p.ellipse(0.18, 0.08, 0.58, 0.84)
    p.ellipse(0.46, 0.0, 0.84, 0.72)
    p.ellipse(0.64, 0.34, 1.0, 1.0)
    p.rect(0.16, 0.6, 0.84, 1.0)


DRAW: dict[str, Callable[[Pen], None]] = {
    "fish": fish, "bird": bird, "butterfly": butterfly, "snail": snail, "turtle": turtle, "rabbit": rabbit,
    "snake": snake, "car": car, "truck": truck, "bus": bus, "bicycle": bicycle, "sailboat": sailboat,
    "airplane": airplane, "rocket": rocket, "hammer": hammer, "key": key, "wrench": wrench, "axe": axe,
    "shovel": shovel, "apple": apple, "banana": banana, "carrot": carrot, "mushroom": mushroom,
    "ice cream": ice_cream, "cherry": cherry, "pizza slice": pizza_slice, "chair": chair, "table": table,
    "lamp": lamp, "bed": bed, "sofa": sofa, "shelf": shelf, "stop sign": stop_sign, "arrow": arrow,
    "star": star, "heart": heart, "moon": moon, "lightning bolt": lightning_bolt, "cross": cross, "cup": cup,
    "bottle": bottle, "umbrella": umbrella, "bell": bell, "clock": clock, "house": house, "tree": tree,
    "flower": flower, "cloud": cloud,
}
