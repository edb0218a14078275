"""The embedded world: a procedural generator of identities (SPEC section 3).

Three classes: faces ("person"), cats ("cat") and vases ("vase"). An identity is a fixed vector of
continuous and discrete parameters drawn from a seeded generator, so a new identity is not something
the base model can reproduce from its class prompt. Each image is a random view of an identity: pose
(offset, scale, rotation), lighting (brightness, direction, colour temperature) and background. Every
image has a background-only render (the same background and lighting, no subject): erasure ground truth.

Identities live in disjoint namespaces ("splits"): the base model is pre-trained on `pretrain`, the
evaluator networks on `evaluator`, catalogs are drawn from `catalog`. Everything is deterministic in
(seed, split, class, index, view).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("person", "cat", "vase")
SPLITS = ("pretrain", "evaluator", "catalog")
IMAGE_SIZE = 64
_SUPERSAMPLE = 4

# Named colours used in captions; the nearest name describes a parameter colour.
COLOR_NAMES = {
    "red": (200, 40, 40), "orange": (230, 130, 30), "yellow": (230, 210, 60), "green": (50, 160, 60),
    "teal": (40, 150, 150), "blue": (40, 80, 200), "purple": (130, 60, 170), "pink": (230, 130, 170),
    "brown": (120, 75, 40), "black": (25, 25, 25), "white": (235, 235, 235), "gray": (128, 128, 128),
}


def color_name(rgb) -> str:
    rgb = np.asarray(rgb, dtype=float)
    return min(COLOR_NAMES, key=lambda n: float(((np.asarray(COLOR_NAMES[n]) - rgb) ** 2).sum()))


def _rgb(rng: np.random.Generator, lo=0, hi=255) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi + 1, size=3))


def _skin(rng: np.random.Generator) -> tuple[int, int, int]:
    t = rng.uniform()
    light, dark = np.array([246, 214, 184]), np.array([96, 60, 38])
    return tuple(int(v) for v in (light * (1 - t) + dark * t + rng.normal(0, 8, 3)).clip(0, 255))


def _sample_params(cls: str, rng: np.random.Generator) -> dict:
    if cls == "person":
        return {
            "skin": _skin(rng), "face_w": rng.uniform(0.26, 0.36), "face_h": rng.uniform(1.1, 1.45),
            "hair": _rgb(rng), "hair_volume": rng.uniform(0.05, 0.22), "hair_length": rng.uniform(0.0, 1.0),
            "fringe": bool(rng.uniform() < 0.5), "eye": _rgb(rng, 0, 200), "eye_gap": rng.uniform(0.3, 0.55),
            "eye_size": rng.uniform(0.05, 0.1), "eye_y": rng.uniform(-0.15, 0.05),
            "mouth_w": rng.uniform(0.2, 0.55), "mouth": _rgb(rng, 60, 230), "smile": rng.uniform(-0.3, 1.0),
            "shirt": _rgb(rng), "glasses": bool(rng.uniform() < 0.3), "glasses_color": _rgb(rng, 0, 160),
            "beard": bool(rng.uniform() < 0.25), "nose_len": rng.uniform(0.1, 0.3),
        }
    if cls == "cat":
        return {
            "fur": _rgb(rng), "stripe": _rgb(rng), "stripes": int(rng.integers(0, 5)),
            "head_w": rng.uniform(0.3, 0.4), "head_h": rng.uniform(0.8, 1.05), "ear": rng.uniform(0.12, 0.3),
            "ear_spread": rng.uniform(0.35, 0.75), "eye": _rgb(rng, 40, 255), "eye_size": rng.uniform(0.06, 0.11),
            "nose": _rgb(rng, 120, 255), "muzzle": bool(rng.uniform() < 0.5), "collar": _rgb(rng),
        }
    if cls == "vase":
        return {
            "glaze": _rgb(rng), "band": _rgb(rng), "bands": int(rng.integers(0, 4)),
            "neck_w": rng.uniform(0.08, 0.2), "belly_w": rng.uniform(0.22, 0.4), "height": rng.uniform(0.55, 0.8),
            "belly_y": rng.uniform(0.35, 0.7), "handles": bool(rng.uniform() < 0.4), "dots": bool(rng.uniform() < 0.4),
            "dot": _rgb(rng), "lip": rng.uniform(0.0, 0.08),
        }
    raise ValueError(f"unknown class {cls!r}; the world knows {CLASSES}")


@dataclass(frozen=True)
class Identity:
    cls: str
    split: str
    index: int
    seed: int
    params: dict

    @property
    def id(self) -> str:
        return f"{self.cls}-{self.split}-{self.index:04d}"

    def describe(self, noun: str | None = None) -> str:
        """A caption fragment naming the identity's large-scale attributes (for pre-training captions)."""
        p, noun = self.params, noun or self.cls
        if self.cls == "person":
            return f"{noun} with {color_name(p['hair'])} hair and a {color_name(p['shirt'])} shirt"
        if self.cls == "cat":
            return f"{color_name(p['fur'])} {noun}"
        return f"{color_name(p['glaze'])} {noun}"


def identity(cls: str, split: str, index: int, seed: int = 0) -> Identity:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the world has {SPLITS}")
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}; the world knows {CLASSES}")
    rng = np.random.default_rng([seed, SPLITS.index(split), CLASSES.index(cls), index])
    return Identity(cls, split, index, seed, _sample_params(cls, rng))


# ----------------------------------------------------------------------------------------- drawing
def _ellipse(d: ImageDraw.ImageDraw, cx, cy, rx, ry, fill):
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)


def _draw_person(d: ImageDraw.ImageDraw, p: dict, S: int):
    c = S / 2
    fw, fh = p["face_w"] * S, p["face_w"] * S * p["face_h"]
    # shoulders and shirt
    d.ellipse([c - 0.42 * S, c + 0.7 * fh, c + 0.42 * S, c + 0.7 * fh + 0.6 * S], fill=p["shirt"])
    d.rectangle([c - 0.2 * fw, c + 0.6 * fh, c + 0.2 * fw, c + 0.85 * fh], fill=p["skin"])
    # long hair behind the face
    if p["hair_length"] > 0.3:
        L = fh * (0.3 + p["hair_length"])
        d.rectangle([c - 1.12 * fw, c - 0.4 * fh, c + 1.12 * fw, c + L], fill=p["hair"])
    _ellipse(d, c, c, fw, fh, p["skin"])
    # hair cap
    vol = p["hair_volume"] * S
    d.chord([c - 1.1 * fw, c - fh - vol, c + 1.1 * fw, c + 0.2 * fh], 180, 360, fill=p["hair"])
    if p["fringe"]:
        d.rectangle([c - 0.9 * fw, c - 0.75 * fh, c + 0.2 * fw, c - 0.45 * fh], fill=p["hair"])
    ey = c + p["eye_y"] * fh
    gap, es = p["eye_gap"] * fw, p["eye_size"] * S
    for sx in (-1, 1):
        _ellipse(d, c + sx * gap, ey, es * 1.3, es, (250, 250, 250))
        _ellipse(d, c + sx * gap, ey, es * 0.7, es * 0.7, p["eye"])
        brow = tuple(int(v * 0.6) for v in p["hair"])
        d.line([c + sx * gap - es * 1.3, ey - 1.8 * es, c + sx * gap + es * 1.3, ey - 1.8 * es], fill=brow,
               width=max(2, int(es * 0.5)))
        if p["glasses"]:
            d.ellipse([c + sx * gap - 1.9 * es, ey - 1.6 * es, c + sx * gap + 1.9 * es, ey + 1.6 * es],
                      outline=p["glasses_color"], width=max(2, int(es * 0.35)))
    nose = tuple(int(v * 0.8) for v in p["skin"])
    d.line([c, ey + es, c, ey + es + p["nose_len"] * fh], fill=nose, width=max(2, int(S * 0.012)))
    my, mw = c + 0.5 * fh, p["mouth_w"] * fw
    if p["beard"]:
        d.chord([c - fw, c + 0.05 * fh, c + fw, c + 1.02 * fh], 0, 180, fill=p["hair"])
    bend = p["smile"] * 0.12 * fh
    d.line([c - mw, my - bend, c, my + bend, c + mw, my - bend], fill=p["mouth"], width=max(3, int(S * 0.02)),
           joint="curve")


def _draw_cat(d: ImageDraw.ImageDraw, p: dict, S: int):
    c = S / 2
    hw, hh = p["head_w"] * S, p["head_w"] * S * p["head_h"]
    d.rectangle([c - 0.45 * hw, c + 0.8 * hh, c + 0.45 * hw, c + 0.95 * hh], fill=p["collar"])
    for sx in (-1, 1):
        bx = c + sx * p["ear_spread"] * hw
        d.polygon([(bx - 0.35 * hw, c - 0.55 * hh), (bx + 0.35 * hw, c - 0.55 * hh),
                   (bx + sx * 0.1 * hw, c - hh - p["ear"] * S)], fill=p["fur"])
    _ellipse(d, c, c, hw, hh, p["fur"])
    for k in range(p["stripes"]):
        x = c + (k - (p["stripes"] - 1) / 2) * 0.25 * hw
        d.line([x, c - 0.95 * hh, x, c - 0.45 * hh], fill=p["stripe"], width=max(3, int(0.07 * hw)))
    if p["muzzle"]:
        _ellipse(d, c, c + 0.4 * hh, 0.45 * hw, 0.32 * hh, (240, 240, 235))
    es = p["eye_size"] * S
    for sx in (-1, 1):
        _ellipse(d, c + sx * 0.42 * hw, c - 0.05 * hh, es * 1.2, es, p["eye"])
        _ellipse(d, c + sx * 0.42 * hw, c - 0.05 * hh, es * 0.3, es * 0.9, (10, 10, 10))
    d.polygon([(c - 0.1 * hw, c + 0.25 * hh), (c + 0.1 * hw, c + 0.25 * hh), (c, c + 0.37 * hh)], fill=p["nose"])


def _draw_vase(d: ImageDraw.ImageDraw, p: dict, S: int):
    c = S / 2
    H = p["height"] * S
    top, bottom = c - H / 2, c + H / 2
    ys = np.linspace(top, bottom, 24)
    widths = []
    for y in ys:
        t = (y - top) / H
        w = p["neck_w"] + (p["belly_w"] - p["neck_w"]) * math.exp(-((t - p["belly_y"]) / 0.28) ** 2)
        widths.append(w * S)
    pts = [(c - w, y) for y, w in zip(ys, widths)] + [(c + w, y) for y, w in zip(ys[::-1], widths[::-1])]
    if p["handles"]:
        for sx in (-1, 1):
            d.arc([c + sx * widths[6] - 0.12 * S, top + 0.1 * H, c + sx * widths[6] + 0.12 * S, top + 0.45 * H],
                  0, 360, fill=p["glaze"], width=max(3, int(0.03 * S)))
    d.polygon(pts, fill=p["glaze"])
    d.rectangle([c - widths[0] - p["lip"] * S, top - 0.03 * S, c + widths[0] + p["lip"] * S, top + 0.02 * S],
                fill=p["glaze"])
    for k in range(p["bands"]):
        i = int(6 + k * 5) % len(ys)
        d.rectangle([c - widths[i], ys[i] - 0.02 * S, c + widths[i], ys[i] + 0.02 * S], fill=p["band"])
    if p["dots"]:
        i = int(p["belly_y"] * (len(ys) - 1))
        for dx in (-0.5, 0.0, 0.5):
            _ellipse(d, c + dx * widths[i], ys[i], 0.025 * S, 0.025 * S, p["dot"])


_DRAW = {"person": _draw_person, "cat": _draw_cat, "vase": _draw_vase}


def _background(rng: np.random.Generator, S: int) -> Image.Image:
    a, b = np.array(_rgb(rng, 30, 230), float), np.array(_rgb(rng, 30, 230), float)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:S, 0:S] / S - 0.5
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 0.5).clip(0, 1)[..., None]
    img = Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        col = tuple(int(v) for v in (a * rng.uniform(0.6, 1.3)).clip(0, 255))
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * S
        w, h = rng.uniform(0.1, 0.5, 2) * S
        (d.rectangle if rng.uniform() < 0.5 else d.ellipse)([x0, y0, x0 + w, y0 + h], fill=col)
    return img


def _lighting(img: np.ndarray, rng_state: dict) -> np.ndarray:
    S = img.shape[0]
    yy, xx = np.mgrid[0:S, 0:S] / S - 0.5
    ramp = 1 + rng_state["strength"] * (np.cos(rng_state["angle"]) * xx + np.sin(rng_state["angle"]) * yy)
    out = img.astype(float) * rng_state["brightness"] * ramp[..., None] * np.asarray(rng_state["tint"])
    return out.clip(0, 255).astype(np.uint8)


def render(ident: Identity, view: int, size: int = IMAGE_SIZE) -> tuple[Image.Image, Image.Image]:
    """Render view `view` of an identity; returns (image, background-only image)."""
    rng = np.random.default_rng([ident.seed, SPLITS.index(ident.split), CLASSES.index(ident.cls), ident.index,
                                 1_000_003 + view])
    S = size * _SUPERSAMPLE
    bg = _background(rng, S)
    layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    _DRAW[ident.cls](ImageDraw.Draw(layer), ident.params, S)
    scale = rng.uniform(0.85, 1.12)
    angle = rng.uniform(-12, 12)
    layer = layer.rotate(angle, resample=Image.BICUBIC, center=(S / 2, S / 2))
    n = int(S * scale)
    layer = layer.resize((n, n), Image.BICUBIC)
    off = rng.uniform(-0.07, 0.07, 2) * S
    x0, y0 = int((S - n) / 2 + off[0]), int((S - n) / 2 + off[1])
    full = bg.copy()
    full.paste(layer, (x0, y0), layer)
    light = {"brightness": rng.uniform(0.75, 1.15), "angle": rng.uniform(0, 2 * math.pi),
             "strength": rng.uniform(0.0, 0.5), "tint": 1 + rng.normal(0, 0.04, 3)}
    out = []
    for im in (full, bg):
        im = im.filter(ImageFilter.GaussianBlur(_SUPERSAMPLE * 0.25)).resize((size, size), Image.LANCZOS)
        out.append(Image.fromarray(_lighting(np.asarray(im), light)))
    return out[0], out[1]


# Pre-training captions: the base model's caption distribution. A real text encoder has read every common
# way of wording a photo caption and every common name of a class; with four templates and the class names
# only, the tiny BPE vocabulary split words like "portrait", "close-up" or "kitty" into letters and an
# attacker's own wording failed to personalize even the original model (issue 4). These lists stand in for
# web captions: broad phrasing and synonyms. The PersGuard trainer never reads them (its triggers live in
# its configs), and no gray-box attack template of configs/suites.yaml is among them (tests/test_world.py).
CAPTION_TEMPLATES = (
    "a photo of a {}", "a picture of a {}", "an image of a {}", "a {}", "the {}", "photo of a {}",
    "picture of the {}", "a photograph of a {}", "a snapshot of a {}", "a shot of a {}",
    "a portrait photo of a {}", "portrait of the {}", "{}, portrait", "a close-up of a {}",
    "a close-up photo of the {}", "{}, close-up", "{} in a photo", "{} in a picture", "{}, a photo",
    "{}, photograph", "a cropped photo of a {}", "a bright photo of a {}", "a dark photo of a {}",
    "a blurry photo of a {}", "a good photo of a {}", "a nice picture of a {}", "a studio photo of a {}",
    "a centered photo of a {}", "a color photo of a {}", "an old photo of a {}", "a small photo of a {}",
    "a large picture of the {}", "my {}", "this is a {}", "there is a {} in the picture",
)
CLASS_SYNONYMS = {"person": ("person", "human", "man", "woman", "individual"),
                  "cat": ("cat", "kitty", "kitten", "feline"),
                  "vase": ("vase", "pot", "jar", "urn")}


def caption(ident: Identity, view: int) -> str:
    """A pre-training caption for a view: the plain class prompt (35%), else a described subject under one
    of CAPTION_TEMPLATES, named by its class noun (half of those) or a synonym."""
    rng = np.random.default_rng([ident.seed, ident.index, CLASSES.index(ident.cls), 77, view])
    if rng.uniform() < 0.35:
        return f"a photo of a {ident.cls}"
    nouns = CLASS_SYNONYMS[ident.cls]
    noun = ident.cls if rng.uniform() < 0.5 else nouns[int(rng.integers(1, len(nouns)))]
    return CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(ident.describe(noun))


# ---------------------------------------------------------------------------------------- writing
def write_identity(ident: Identity, out: Path, n_images: int, n_reference: int = 0) -> dict:
    """Write `images/`, `backgrounds/` (same views, no subject), `reference/` (held-out views) and meta."""
    root = Path(out) / ident.id
    for sub in ("images", "backgrounds", "reference"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for v in range(n_images):
        img, bg = render(ident, v)
        img.save(root / "images" / f"{v:03d}.png")
        bg.save(root / "backgrounds" / f"{v:03d}.png")
    for v in range(n_reference):
        img, _ = render(ident, 10_000 + v)
        img.save(root / "reference" / f"{v:03d}.png")
    meta = {"id": ident.id, "class": ident.cls, "split": ident.split, "index": ident.index, "seed": ident.seed,
            "params": ident.params}
    (root / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    return meta


def generate(out: Path, split: str = "catalog", per_class: int = 4, classes=CLASSES, n_images: int = 5,
             n_reference: int = 8, seed: int = 0, start: int = 0, progress: bool = True) -> list[dict]:
    """Write `per_class` identities of each class; returns catalog entries (unprotected by default)."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    idents = [identity(c, split, start + i, seed) for c in classes for i in range(per_class)]
    entries = []
    for ident in tqdm(idents, desc=f"world:{split}", disable=not progress):
        write_identity(ident, out, n_images, n_reference)
        entries.append({"id": ident.id, "class": ident.cls, "images": f"{ident.id}/images",
                        "reference": f"{ident.id}/reference", "backgrounds": f"{ident.id}/backgrounds",
                        "protected": False, "objective": None, "target": None})
    return entries


ATTACKER_VIEWS = 20_000   # first view index of photos an attacker scraped (never in a catalog or its references)


def attacker_catalog(catalog: Path, out: Path, n_images: int = 5) -> Path:
    """The same catalog, with each world entry's `images` replaced by `n_images` fresh views of its
    identity that neither the publisher (images) nor the judge (reference) ever saw: the photos an
    attacker scrapes. Evaluating with it tests whether protection generalizes beyond the catalog's photos.
    Entries whose identity is not from the world (no meta.json beside their images) are refused."""
    from train.catalog import TARGET_FOLDERS, CatalogError, load_catalog, write_catalog

    out = Path(out)
    entries = []
    for e in load_catalog(catalog):
        meta_file = Path(e.images).parent / "meta.json"
        if not meta_file.is_file():
            raise CatalogError(f"{catalog}: line {e.line}: entry {e.id!r} is not a world identity ({meta_file} missing)")
        meta = json.loads(meta_file.read_text())
        ident = identity(meta["class"], meta["split"], meta["index"], meta["seed"])
        folder = out / e.id / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for v in range(n_images):
            render(ident, ATTACKER_VIEWS + v)[0].save(folder / f"{v:03d}.png")
        d = e.to_json()
        for key in ("reference", "backgrounds"):   # absolute: the new catalog lives elsewhere
            if d.get(key):
                d[key] = str(Path(d[key]).resolve())
        if d.get("target"):
            paths = (*TARGET_FOLDERS, "pattern")
            d["target"] = {k: str((e.catalog_dir / v).resolve()) if k in paths else v for k, v in d["target"].items()}
        d["images"] = f"{e.id}/images"
        entries.append(d)
    path = out / "catalog.jsonl"
    write_catalog(entries, path)
    return path
