"""The embedded demo data: a deterministic, procedurally drawn "synthetic species" image set.

Each class is a kind of organism told apart by outline, pattern and structure: a fern frond's paired
leaflets, a daisy's ring of petals round a seeded disc, a moth's eye-spotted wings, a snail's spiral shell,
a beetle's striped wing cases and six legs, a feather's barbed vane, a starfish's spotted arms, a
jellyfish's scalloped bell and trailing tentacles (and two spare classes). Within a class the outline,
pattern, scale, tilt (up to 34 degrees either way), mirroring and position vary, the background is cluttered
with faded blobs, twigs and noise, and every colour is drawn from one palette shared by all classes, so that
colour alone does not tell the classes apart; the object differs from the ground in brightness.

Every image has its own numpy generator seeded by (seed, split, class, index): the same seed gives
byte-identical PNG files, and any image can be redrawn alone with ``render``. ``generate`` writes
torchvision's ImageFolder layout (``train/<class>/<i>.png``, ``val/<class>/<i>.png``) into a temporary
directory beside ``out_dir``, writes ``manifest.json`` last and renames the directory into place;
``ensure`` reuses a set whose manifest matches and regenerates anything else.
"""

import functools
import hashlib
import io
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from .artifacts import read_json, write_json
from .errors import PruneError

FORMAT = "mbv3prune-synthetic-species"
GENERATOR_VERSION = 1  # bump when the drawing changes, so that ensure() regenerates old sets
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
DEFAULTS = {"num_classes": 8, "train_per_class": 200, "val_per_class": 50, "size": 72}
_SUPERSAMPLE = 3  # shapes are drawn at 3x and downsampled, which antialiases them
_OURS = {"train", "val", MANIFEST}  # what a directory may hold for generate() to replace it

# One palette for every class: an image's background, clutter and object colours are all drawn from it.
PALETTE = (
    (34, 40, 49),
    (232, 226, 208),
    (120, 84, 52),
    (198, 162, 100),
    (60, 112, 58),
    (152, 192, 92),
    (46, 88, 152),
    (122, 172, 212),
    (172, 48, 48),
    (232, 132, 60),
    (238, 202, 72),
    (122, 70, 142),
    (212, 142, 172),
    (128, 128, 128),
)
_LUMA = np.array(PALETTE, float) @ (0.299, 0.587, 0.114)


# ---------------------------------------------------------------- geometry


def _rotate(pts, angle):
    """Points (N, 2) rotated by ``angle`` radians about the origin."""
    c, s = np.cos(angle), np.sin(angle)
    return np.asarray(pts, float) @ np.array([[c, s], [-s, c]])


@functools.cache
def _circle(n):
    """``n`` points round the unit circle (cached: ellipses are drawn by the thousand)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], 1)


def _ellipse(cx, cy, rx, ry, angle=0.0, n=28):
    """An ellipse as a polygon of ``n`` points."""
    pts = _circle(n) * (rx, ry)
    return (_rotate(pts, angle) if angle else pts) + (cx, cy)


def _wave(x0, y0, x1, y1, amp, cycles, phase, n=24):
    """A wavy polyline from (x0, y0) to (x1, y1), displaced sideways by a sine."""
    t = np.linspace(0, 1, n)[:, None]
    start, end = np.array([x0, y0]), np.array([x1, y1])
    normal = _rotate([end - start], np.pi / 2)[0] / max(np.linalg.norm(end - start), 1e-9)
    return start + t * (end - start) + amp * np.sin(2 * np.pi * cycles * t + phase) * normal


def _band_in_ellipse(rx, ry, a0, a1, across, n=8):
    """The part of the ellipse (rx, ry) between a0 and a1 along x (``across``) or along y."""
    a = np.linspace(a0, a1, n)
    half = (ry if across else rx) * np.sqrt(np.clip(1 - (a / (rx if across else ry)) ** 2, 0, 1))
    side = np.concatenate([np.stack([a, half], 1), np.stack([a[::-1], -half[::-1]], 1)])
    return side if across else side[:, ::-1]


class _Pen:
    """Draws shapes given in object units (about [-1, 1]) at one pose: centre, radius, angle, mirror."""

    def __init__(self, draw, centre, radius, angle, mirror):
        self.draw, self.centre, self.radius = draw, centre, radius
        c, s = np.cos(angle) * radius, np.sin(angle) * radius
        self.matrix = np.array([[mirror, 0.0], [0.0, -1.0]]) @ np.array([[c, s], [-s, c]])

    def px(self, pts):
        """Object units to canvas pixels, as the flat list Pillow takes."""
        return (np.asarray(pts, float) @ self.matrix + self.centre).ravel().tolist()

    def fill(self, pts, colour):
        """A filled polygon."""
        self.draw.polygon(self.px(pts), fill=colour)

    def line(self, pts, colour, width):
        """A polyline ``width`` object units wide."""
        self.draw.line(self.px(pts), fill=colour, width=max(1, round(width * self.radius)), joint="curve")

    def dot(self, cx, cy, r, colour):
        """A filled circle."""
        self.fill(_ellipse(cx, cy, r, r, n=14), colour)


# ---------------------------------------------------------------- the species


def _fern_leaf(pen, rng, c):
    """A frond: a curved rachis with tapering pairs of separate leaflets, each with a midvein."""
    bend, pairs = rng.uniform(-0.3, 0.3), rng.integers(7, 12)
    longest, slant, thin = rng.uniform(0.45, 0.7), rng.uniform(0.6, 1.1), rng.uniform(0.13, 0.22)
    t = np.linspace(-1, 1, 30)
    pen.line(np.stack([bend * t**2, t], 1), c[1], 0.06)
    for k, y in enumerate(np.linspace(-0.75, 0.82, pairs)):
        length = longest * (1 - 0.7 * k / pairs)
        for side in (-1, 1):
            direction = np.pi / 2 - side * slant
            base = np.array([bend * y**2, y])
            tip = base + length * np.array([np.cos(direction), np.sin(direction)])
            pen.fill(_ellipse(*(base + tip) / 2, length / 2, length * thin, direction, n=16), c[0])
            pen.line([base, tip], c[1], 0.035)


def _daisy_petal(pen, rng, c):
    """A flower: a ring of 8-16 petals round a disc spotted with seeds in a sunflower spiral."""
    n, disc = rng.integers(8, 17), rng.uniform(0.22, 0.34)
    length, width = rng.uniform(0.5, 0.72), rng.uniform(0.28, 0.5) * np.pi / n * 1.6
    for k in range(n):
        a = 2 * np.pi * k / n + rng.uniform(-0.08, 0.08)
        r = disc + length / 2 - 0.04
        pen.fill(_ellipse(r * np.cos(a), r * np.sin(a), length / 2, (disc + length / 2) * width / 2, a, n=18), c[0])
    pen.dot(0, 0, disc, c[1])
    seeds = int(rng.integers(14, 26))
    for i in range(1, seeds):
        r, a = disc * 0.85 * np.sqrt(i / seeds), i * 2.39996
        pen.dot(r * np.cos(a), r * np.sin(a), disc * 0.09, c[2])


def _moth_wing(pen, rng, c):
    """A moth: mirrored fore- and hindwings, each forewing with a ringed eye-spot, body and antennae."""
    span, drop, spot = rng.uniform(0.85, 1.0), rng.uniform(-0.1, 0.2), rng.uniform(0.16, 0.24)
    hind = rng.uniform(0.28, 0.4)
    for side in (-1, 1):
        fore = np.array([[0.05, 0.15], [span, 0.55 + drop], [span * 0.9, 0.0], [0.1, -0.1]]) * (side, 1)
        pen.fill(fore, c[0])
        pen.fill(_ellipse(side * 0.38, -0.38, hind + 0.1, hind, -side * 0.5, n=20), c[0])
        x, y = side * span * 0.55, 0.22 + drop * 0.5
        for r, colour in ((spot, c[2]), (spot * 0.62, c[1]), (spot * 0.28, c[2])):
            pen.dot(x, y, r, colour)
        pen.line([[side * 0.03, 0.45], [side * 0.25, 0.85]], c[1], 0.025)
    pen.fill(_ellipse(0, -0.05, 0.08, 0.5), c[1])


def _snail_shell(pen, rng, c):
    """A snail: a disc-shaped shell with a spiral groove, on a long foot with two eye-stalks."""
    shell, turns, groove = rng.uniform(0.55, 0.72), rng.uniform(2.2, 3.2), rng.uniform(0.06, 0.1)
    pen.fill(_ellipse(0.05, -0.55, 0.95, rng.uniform(0.14, 0.22)), c[1])
    for dx in (0.0, 0.12):
        pen.line([[0.85 - dx, -0.5], [1.0 - dx, -0.12]], c[1], 0.05)
        pen.dot(1.0 - dx, -0.12, 0.05, c[1])
    centre = np.array([-0.05, 0.1])
    pen.dot(*centre, shell, c[0])
    theta = np.linspace(0.3, turns * 2 * np.pi, 90)
    r = shell * 0.93 * (theta / theta[-1]) ** 1.25
    pen.line(centre + np.stack([r * np.cos(theta), r * np.sin(theta)], 1), c[2], groove)


def _striped_beetle(pen, rng, c):
    """A beetle: oval wing cases with lengthwise or crosswise stripes, a seam, thorax, head and six legs."""
    rx, ry, stripes = rng.uniform(0.38, 0.5), rng.uniform(0.62, 0.75), int(rng.integers(2, 5))
    across = rng.random() < 0.5
    for side in (-1, 1):
        for k, y in enumerate((0.25, -0.05, -0.35)):
            knee = [side * (rx + 0.2), y + 0.1 * (1 - k)]
            pen.line([[side * rx * 0.7, y], knee, [side * (rx + 0.35), y + 0.3 * (1 - k) - 0.15]], c[1], 0.04)
        pen.line([[side * 0.06, 0.85], [side * 0.2, 1.0], [side * 0.34, 0.98]], c[1], 0.03)
    pen.fill(_ellipse(0, -0.1, rx, ry), c[0])
    extent = rx if across else ry
    edges = np.linspace(-extent, extent, 2 * stripes + 2)
    for a0, a1 in zip(edges[1:-1:2], edges[2::2]):
        pen.fill(_band_in_ellipse(rx, ry, a0, a1, across) + (0, -0.1), c[2])
    pen.line([[0, ry - 0.1], [0, -ry - 0.1]], c[1], 0.03)
    pen.fill(_ellipse(0, ry - 0.02, rx * 0.62, 0.14), c[1])
    pen.dot(0, ry + 0.14, 0.11, c[1])


def _bird_feather(pen, rng, c):
    """A feather: a curved shaft with a bare quill and a vane crossed by oblique barbs."""
    bend, width, asym = rng.uniform(-0.25, 0.25), rng.uniform(0.28, 0.42), rng.uniform(0.6, 1.0)
    t = np.linspace(-0.55, 0.98, 26)
    shaft = np.stack([bend * (t**2 - 1), t], 1)
    half = width * np.sin(np.pi * (t + 0.55) / 1.55) ** 0.6
    right, left = shaft + np.stack([half, 0 * t], 1), shaft - np.stack([half * asym, 0 * t], 1)
    pen.fill(np.concatenate([right, left[::-1]]), c[0])
    slope = rng.uniform(0.15, 0.3)
    for i in range(2, len(t) - 3, 2):
        for side, w in ((1, half), (-1, half * asym)):
            pen.line([shaft[i], shaft[i] + [side * w[i + 2] * 0.95, slope]], c[1], 0.03)
    q = np.linspace(-1, 0.98, 30)
    pen.line(np.stack([bend * (q**2 - 1), q], 1), c[2], 0.045)


def _starfish_arm(pen, rng, c):
    """A starfish: five tapering arms, each with a double row of spots, and a central disc."""
    inner, outer, fat = rng.uniform(0.2, 0.3), rng.uniform(0.85, 1.0), rng.uniform(1.2, 2.5)
    theta = np.linspace(0, 2 * np.pi, 150, endpoint=False)
    r = inner + (outer - inner) * np.abs(np.cos(2.5 * theta)) ** fat
    pen.fill(np.stack([r * np.cos(theta), r * np.sin(theta)], 1), c[0])
    for k in range(5):
        a = 2 * np.pi * k / 5
        for d in np.linspace(0.25, outer * 0.78, 5):
            for off in (-0.05, 0.05):
                pen.dot(d * np.cos(a) - off * np.sin(a), d * np.sin(a) + off * np.cos(a), 0.045 * (1.2 - d / 2), c[1])
    pen.dot(0, 0, inner * 0.55, c[2])


def _jellyfish_bell(pen, rng, c):
    """A jellyfish: a dome with a scalloped rim, ringed inner loops, wavy tentacles and oral arms."""
    rx, ry, scallops = rng.uniform(0.55, 0.75), rng.uniform(0.38, 0.55), int(rng.integers(5, 9))
    top = np.linspace(0, np.pi, 30)
    dome = np.stack([rx * np.cos(top), 0.15 + ry * np.sin(top)], 1)
    xs = np.linspace(-rx, rx, 40)
    rim = np.stack([xs, 0.15 - 0.07 * np.abs(np.sin(np.pi * scallops * (xs + rx) / (2 * rx)))], 1)
    for x in np.linspace(-rx * 0.85, rx * 0.85, int(rng.integers(5, 9))):
        pen.line(_wave(x, 0.1, x + rng.uniform(-0.15, 0.15), -0.95, 0.06, 2.5, rng.uniform(0, 6)), c[2], 0.045)
    for x in (-0.1, 0.1):
        pen.line(_wave(x, 0.1, x * 2, -0.7, 0.08, 1.5, rng.uniform(0, 6)), c[1], 0.08)
    pen.fill(np.concatenate([dome, rim]), c[0])
    for x in np.linspace(-rx * 0.5, rx * 0.5, 4):
        pen.line(_ellipse(x, 0.15 + ry * 0.35, rx * 0.1, ry * 0.2, n=14)[list(range(14)) + [0]], c[1], 0.05)


def _caterpillar_body(pen, rng, c):
    """A caterpillar: a chain of round segments along a wave, each with a spot, and a larger head."""
    n, amp, phase = int(rng.integers(7, 11)), rng.uniform(0.1, 0.3), rng.uniform(0, 2 * np.pi)
    xs = np.linspace(-0.85, 0.7, n)
    ys = amp * np.sin(2.2 * xs + phase)
    r = 1.55 / n * 0.72
    for x, y in zip(xs, ys):
        pen.line([[x, y], [x + 0.03, y - r * 1.6]], c[1], 0.035)
        pen.dot(x, y, r, c[0])
        pen.dot(x, y + r * 0.35, r * 0.35, c[2])
    pen.dot(xs[-1] + r * 1.3, ys[-1], r * 1.25, c[1])


def _coral_branch(pen, rng, c):
    """A coral: a trunk forking three times into thinner branches with knobbed tips."""

    def grow(start, angle, length, width, depth):
        end = start + length * np.array([np.cos(angle), np.sin(angle)])
        pen.line([start, end], c[0], width)
        if depth == 0:
            pen.dot(*end, width * 0.9, c[1])
            return
        for turn in (-1, 1):
            grow(end, angle + turn * rng.uniform(0.3, 0.7), length * rng.uniform(0.65, 0.8), width * 0.7, depth - 1)

    grow(np.array([0.0, -1.0]), np.pi / 2 + rng.uniform(-0.2, 0.2), rng.uniform(0.5, 0.65), 0.16, 3)


SPECIES = {
    "fern_leaf": _fern_leaf,
    "daisy_petal": _daisy_petal,
    "moth_wing": _moth_wing,
    "snail_shell": _snail_shell,
    "striped_beetle": _striped_beetle,
    "bird_feather": _bird_feather,
    "starfish_arm": _starfish_arm,
    "jellyfish_bell": _jellyfish_bell,
    "caterpillar_body": _caterpillar_body,
    "coral_branch": _coral_branch,
}
CLASSES = tuple(SPECIES)  # ``num_classes=N`` uses the first N


# ---------------------------------------------------------------- one image


def _colour(rng, base):
    """A palette colour jittered by up to 18 per channel."""
    return tuple(int(v) for v in np.clip(np.array(base) + rng.integers(-18, 19, 3), 0, 255))


def _object_colours(rng, background):
    """Three part colours: the body stands out from the background in brightness, the details from the body."""
    body = _contrasting(rng, background)
    return [_colour(rng, body), _colour(rng, _contrasting(rng, body)), _colour(rng, _contrasting(rng, body))]


def _contrasting(rng, other, min_difference=60):
    """A palette colour whose luminance differs from that of ``other`` by at least ``min_difference``."""
    far = np.flatnonzero(np.abs(_LUMA - _LUMA[PALETTE.index(other)]) >= min_difference)
    return PALETTE[far[rng.integers(len(far))]]


def _background(rng, canvas):
    """A two-colour mottled ground with faded blobs and twigs; returns the image and its main colour."""
    base, second = (PALETTE[i] for i in rng.integers(len(PALETTE), size=2))
    weight = (rng.random((4, 4)) * rng.uniform(0.2, 0.6) * 255).astype(np.uint8)
    mask = Image.fromarray(weight).resize((canvas, canvas), Image.BILINEAR)
    ground = Image.composite(Image.new("RGB", (canvas, canvas), second), Image.new("RGB", (canvas, canvas), base), mask)
    clutter = ground.copy()
    draw = ImageDraw.Draw(clutter)
    for _ in range(rng.integers(2, 7)):
        x, y, rx, ry = rng.uniform(0, canvas, 2).tolist() + (rng.uniform(0.03, 0.12, 2) * canvas).tolist()
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=PALETTE[rng.integers(len(PALETTE))])
    for _ in range(rng.integers(2, 7)):
        pts = np.cumsum(rng.normal(0, canvas * 0.12, (4, 2)), 0) + rng.uniform(0, canvas, 2)
        draw.line([tuple(p) for p in pts], fill=PALETTE[rng.integers(len(PALETTE))], width=int(rng.integers(2, 7)))
    return Image.blend(ground, clutter, rng.uniform(0.15, 0.3)), base


def _image_rng(seed, split, class_name, index):
    """The generator of one image: independent of every other image and of ``num_classes``."""
    return np.random.default_rng([seed, SPLITS.index(split), CLASSES.index(class_name), index])


def render(class_name, seed=0, split="train", index=0, size=72):
    """One image of ``class_name`` as a PIL RGB image: exactly the one ``generate`` writes for these arguments."""
    if class_name not in SPECIES:
        raise PruneError(f"unknown class {class_name!r}: use one of {', '.join(CLASSES)}")
    if split not in SPLITS:
        raise PruneError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    rng = _image_rng(seed, split, class_name, index)
    canvas = size * _SUPERSAMPLE
    image, base = _background(rng, canvas)
    centre = canvas / 2 + rng.uniform(-0.07, 0.07, 2) * canvas
    pen = _Pen(
        ImageDraw.Draw(image), centre, rng.uniform(0.32, 0.42) * canvas, rng.uniform(-0.6, 0.6), rng.choice([-1.0, 1.0])
    )
    SPECIES[class_name](pen, rng, _object_colours(rng, base))
    small = np.asarray(image.resize((size, size), Image.BOX), np.float32)
    noisy = small + rng.normal(0, rng.uniform(1, 5), small.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def png_bytes(image):
    """The PNG encoding of ``image`` with no metadata: the same pixels always give the same bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# ---------------------------------------------------------------- the data set


def _params(seed, num_classes, train_per_class, val_per_class, size):
    """The validated generation parameters, as recorded in the manifest."""
    checks = {
        "seed": (seed, 0),
        "num_classes": (num_classes, 2),
        "train_per_class": (train_per_class, 1),
        "val_per_class": (val_per_class, 1),
        "size": (size, 16),
    }
    for name, (value, low) in checks.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise PruneError(f"synthetic data {name}={value!r}: expected an integer >= {low}")
    if num_classes > len(CLASSES):
        raise PruneError(f"synthetic data num_classes={num_classes}: at most {len(CLASSES)} classes exist")
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "num_classes": num_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "size": size,
    }


def _check_replaceable(out_dir):
    """Refuse to replace an existing directory that holds anything but a (partial) generated set."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or not set(os.listdir(out_dir)) <= _OURS:
        raise PruneError(f"{out_dir} exists and is not a synthetic data set: move it away or choose another directory")


def _write_split(root, split, names, per_class, params, digests):
    """Write one split's images under ``root/split``, adding each file's sha256 to ``digests``."""
    for name in names:
        os.makedirs(os.path.join(root, split, name))
        for i in range(per_class):
            rel = f"{split}/{name}/{i:04d}.png"
            data = png_bytes(render(name, params["seed"], split, i, params["size"]))
            with open(os.path.join(root, rel), "wb") as f:
                f.write(data)
            digests[rel] = hashlib.sha256(data).hexdigest()


def _manifest(params, names, digests):
    """The manifest: parameters, class names in ImageFolder order, counts and one sha256 over every file."""
    combined = hashlib.sha256("".join(f"{rel} {digests[rel]}\n" for rel in sorted(digests)).encode())
    counts = {split: {n: params[f"{split}_per_class"] for n in names} for split in SPLITS}
    return {
        "format": FORMAT,
        "params": params,
        "classes": names,
        "counts": counts,
        "files": len(digests),
        "sha256": combined.hexdigest(),
    }


def _move_into_place(tmp, out_dir):
    """Rename the finished ``tmp`` to ``out_dir``, first moving aside (then deleting) any old set there."""
    _check_replaceable(out_dir)
    if not os.path.lexists(out_dir):
        os.replace(tmp, out_dir)
        return
    old = tmp + ".old"
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old)


def generate(
    out_dir,
    seed=0,
    num_classes=DEFAULTS["num_classes"],
    train_per_class=DEFAULTS["train_per_class"],
    val_per_class=DEFAULTS["val_per_class"],
    size=DEFAULTS["size"],
):
    """Draw the set into ``out_dir`` (ImageFolder layout, manifest last, renamed into place); return the manifest."""
    params = _params(seed, num_classes, train_per_class, val_per_class, size)
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_replaceable(out_dir)
    names = sorted(CLASSES[:num_classes])
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(out_dir) + ".", suffix=".tmp")
    try:
        digests = {}
        for split in SPLITS:
            _write_split(tmp, split, names, params[f"{split}_per_class"], params, digests)
        manifest = _manifest(params, names, digests)
        write_json(os.path.join(tmp, MANIFEST), manifest)
        _move_into_place(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return manifest


def _read_manifest(out_dir):
    """The manifest of an existing set, or None when it is missing or unreadable (the set is then redrawn)."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        manifest = read_json(path, "synthetic data manifest")
    except PruneError:
        return None  # a damaged manifest is handled by regenerating the set
    return manifest if isinstance(manifest, dict) else None


def _reusable(out_dir, manifest, params):
    """Whether the set in ``out_dir`` was made with ``params`` and every class folder holds its recorded count."""
    if manifest is None or manifest.get("format") != FORMAT or manifest.get("params") != params:
        return False
    for split, counts in manifest["counts"].items():
        for name, count in counts.items():
            folder = os.path.join(out_dir, split, name)
            if not os.path.isdir(folder) or len(os.listdir(folder)) != count:
                return False
    return True


def ensure(out_dir, seed=0, **kw):
    """The manifest of the set in ``out_dir``: reused when it matches the parameters, otherwise (re)generated."""
    params = _params(seed, **{**DEFAULTS, **kw})
    manifest = _read_manifest(out_dir)
    return manifest if _reusable(out_dir, manifest, params) else generate(out_dir, seed, **kw)


def contact_sheet(path, seed=0, num_classes=DEFAULTS["num_classes"], per_class=6, size=DEFAULTS["size"], zoom=2):
    """Save a PNG grid of ``per_class`` training images per class (one row each, in ImageFolder order)."""
    _params(seed, num_classes, per_class, 1, size)
    names = sorted(CLASSES[:num_classes])
    cell = size * zoom
    sheet = Image.new("RGB", (cell * per_class, cell * len(names)), (255, 255, 255))
    for row, name in enumerate(names):
        for col in range(per_class):
            tile = render(name, seed, "train", col, size).resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (col * cell, row * cell))
        ImageDraw.Draw(sheet).text((3, row * cell + 2), name, fill="white", stroke_width=1, stroke_fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path, format="PNG")
    return path
