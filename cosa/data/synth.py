"""A synthetic weakly supervised segmentation benchmark, written in the VOC layout.

`write_synthetic_dataset(out, n_train, n_val, n_test, seed)` writes::

    out/JPEGImages/<split>_<index:06d>.jpg        RGB, JPEG quality JPEG_QUALITY, no metadata
    out/SegmentationClass/<name>.png              palette PNG (VOC colours): 0 background,
                                                  1..C classes, 255 = 2 px boundary band
    out/ImageSets/Segmentation/{train,val,test}.txt   (a split with 0 images gets no list)
    out/cls_labels_onehot.npy                     dict name -> float32 (C,), like the reference
    out/classes.json                              {"names": ["background", ...], "palette": [...]}
    out/synth.json                                generator id, parameters, per-image context and
                                                  the measured statistics (marks the folder as ours)

Determinism: each image has its own generator seeded by (seed, split, index), so an image does not
depend on how many others are generated or in which order, and the same seed gives byte-identical
files on one software stack (NumPy, OpenCV, Pillow/libjpeg versions).

Parameters (module constants; the rendering ones are in `cosa.data.synth_scene`):

- CLASS_SPECS: C = 10 foreground classes. Each has a shape family, a texture family and an HSV
  colour band; every colour band is shared by exactly two classes and every texture by two, so no
  class is told apart by colour alone or by texture alone (shape is needed too):

  ========  =========  ========  ===========
  class     shape      texture   colour band
  ========  =========  ========  ===========
  disc      disc       noise     red
  ring      ring       stripes   red
  star      star       dots      blue
  cross     cross      checker   blue
  triangle  triangle   gradient  green
  crescent  crescent   stripes   yellow
  blob      blob       checker   green
  bar       bar        noise     purple
  hexagon   hexagon    dots      yellow
  diamond   diamond    gradient  purple
  ========  =========  ========  ===========

  Backgrounds reuse these hues (water/sky blue, grass green, brick red, sand yellow).
- SIZE_RANGE = (160, 320): height and width ~ U{160..320}; MIN_ASPECT_GAP = 24: redrawn until
  |H - W| >= 24, so no image is square.
- OBJECT_COUNT_PROBS: 1, 2, 3 or 4 objects with probabilities 0.3, 0.3, 0.25, 0.15 (at least 2
  when a pair is drawn). NEW_CLASS_PROB = 0.5: each object after the anchor (and its partner)
  is a new class with this probability, else another instance of a class already present.
- Co-occurrence (the coexistence problem; measured by `measure_cooccurrence`):
  * An anchor class is drawn uniformly; the other classes of an image are extras.
  * PAIR_RATES = {(ring, cross): 0.8, (triangle, hexagon): 0.8}: P(both | at least one of the
    pair) = rate, so P(cross | ring) = 2 r / (1 + r) = 0.89. Paired classes appear only as anchors
    or partners, and partners are placed touching/overlapping each other.
  * CONTEXT_RATES = {crescent: (water, 0.5), bar: (brick, 0.5), blob: (grass, 0.5)}:
    P(background context | class present) = rate; otherwise one of the other contexts uniformly.
    At most one context-bound class per image (so the rate is exact); images without one get a
    uniform context, so P(crescent | water) is well above chance (see `SynthStats`).
  Expected (20,000 planned scenes): 32 % of images hold a co-occurring pair, 23 % a
  context-bound class on its typical context, and P(class | its context) is about 0.39.
- CONTEXTS (6): water, grass, brick, sand, sky, tiles, plus clutter (`cosa.data.synth_scene`).
- JPEG_QUALITY = 90 with 4:2:0 chroma subsampling.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cosa.data.classes import CLASSES_FILENAME, IGNORE_INDEX, classes_file_text, voc_palette
from cosa.data.index import LABELS_FILENAME, SPLIT_DIR, labels_from_mask
from cosa.data.synth_scene import ClassSpec, ObjectPlan, ScenePlan, render_scene
from cosa.data.synth_textures import CONTEXTS
from cosa.errors import DataError
from cosa.files import staged_folder
from cosa.images import palette_image

logger = logging.getLogger(__name__)

_RED, _BLUE, _GREEN, _YELLOW, _PURPLE = 0.02, 0.62, 0.33, 0.14, 0.8  # hue band centres, turns

CLASS_SPECS: tuple[ClassSpec, ...] = (
    ClassSpec("disc", "disc", "noise", _RED),
    ClassSpec("ring", "ring", "stripes", _RED),
    ClassSpec("star", "star", "dots", _BLUE),
    ClassSpec("cross", "cross", "checker", _BLUE),
    ClassSpec("triangle", "triangle", "gradient", _GREEN),
    ClassSpec("crescent", "crescent", "stripes", _YELLOW),
    ClassSpec("blob", "blob", "checker", _GREEN),
    ClassSpec("bar", "bar", "noise", _PURPLE),
    ClassSpec("hexagon", "hexagon", "dots", _YELLOW),
    ClassSpec("diamond", "diamond", "gradient", _PURPLE),
)
CLASS_NAMES: tuple[str, ...] = ("background", *(c.name for c in CLASS_SPECS))

PAIR_RATES: dict[tuple[str, str], float] = {("ring", "cross"): 0.8, ("triangle", "hexagon"): 0.8}
CONTEXT_RATES: dict[str, tuple[str, float]] = {
    "crescent": ("water", 0.5),
    "bar": ("brick", 0.5),
    "blob": ("grass", 0.5),
}
SIZE_RANGE = (160, 320)
MIN_ASPECT_GAP = 24
OBJECT_COUNT_PROBS = (0.3, 0.3, 0.25, 0.15)
NEW_CLASS_PROB = 0.5
JPEG_QUALITY = 90
JPEG_SUBSAMPLING = "4:2:0"

SPLITS = ("train", "val", "test")
GENERATOR_ID = "cosa.data.synth"
FORMAT_VERSION = 2
MANIFEST_FILENAME = "synth.json"

_INDEX = {name: i for i, name in enumerate(CLASS_NAMES[1:])}
_PARTNER: dict[int, tuple[int, float]] = {}
for (_a, _b), _rate in PAIR_RATES.items():
    _PARTNER[_INDEX[_a]] = (_INDEX[_b], _rate)
    _PARTNER[_INDEX[_b]] = (_INDEX[_a], _rate)
_CONTEXT_BOUND = {_INDEX[name]: ctx for name, ctx in CONTEXT_RATES.items()}


@dataclass(frozen=True)
class SynthStats:
    """Co-occurrence measured on a generated set (fractions in [0, 1]; None when undefined).

    Attributes:
        images: number of images measured.
        pair_image_fraction: images that hold both classes of some pair in PAIR_RATES.
        pair_rates: per pair "a+b": P(both | at least one), compare with PAIR_RATES.
        context_image_fraction: images where a context-bound class is on its typical context.
        context_rates: per context-bound class: P(typical context | class present), compare with
            CONTEXT_RATES.
        class_given_context: per context-bound class: P(class present | its typical context).
        mean_classes: foreground classes per image.
        mean_foreground: fraction of pixels that are foreground (boundary band excluded).
    """

    images: int
    pair_image_fraction: float
    pair_rates: dict[str, float | None]
    context_image_fraction: float
    context_rates: dict[str, float | None]
    class_given_context: dict[str, float | None]
    mean_classes: float
    mean_foreground: float | None = None


@dataclass(frozen=True)
class SynthSummary:
    """What `write_synthetic_dataset` wrote.

    Attributes:
        root: the dataset folder.
        seed: the generator seed.
        n_train, n_val, n_test: images per split.
        class_names: incl. background (as in classes.json).
        stats: co-occurrence and foreground statistics measured on the written masks.
        seconds: wall-clock generation time.
    """

    root: Path
    seed: int
    n_train: int
    n_val: int
    n_test: int
    class_names: tuple[str, ...]
    stats: SynthStats
    seconds: float

    def __str__(self) -> str:
        """One line for logs and the CLI."""
        return (
            f"{self.stats.images} images (train {self.n_train}, val {self.n_val}, test "
            f"{self.n_test}), {len(self.class_names) - 1} classes, seed {self.seed}: "
            f"{self.stats.pair_image_fraction:.0%} hold a co-occurring pair, "
            f"{self.stats.context_image_fraction:.0%} a class on its typical context, "
            f"{self.seconds:.1f} s"
        )


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: a pure function of (seed, split, index)."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))


def plan_scene(rng: np.random.Generator) -> ScenePlan:
    """Decide an image's size, classes, object count and background context (see module doc)."""
    low, high = SIZE_RANGE
    height = int(rng.integers(low, high + 1))
    width = int(rng.integers(low, high + 1))
    while abs(height - width) < MIN_ASPECT_GAP:
        width = int(rng.integers(low, high + 1))

    num_classes = len(CLASS_SPECS)
    anchor = int(rng.integers(num_classes))
    present = [anchor]
    objects = [ObjectPlan(anchor + 1)]
    if anchor in _PARTNER:
        partner, rate = _PARTNER[anchor]
        if rng.random() < rate:
            present.append(partner)
            first, second = (anchor, partner) if rng.random() < 0.5 else (partner, anchor)
            objects = [ObjectPlan(first + 1), ObjectPlan(second + 1, near=0)]  # random occluder

    count = 1 + int(rng.choice(len(OBJECT_COUNT_PROBS), p=OBJECT_COUNT_PROBS))
    pool = [c for c in range(num_classes) if c not in _PARTNER and c not in present]
    if any(c in _CONTEXT_BOUND for c in present):
        pool = [c for c in pool if c not in _CONTEXT_BOUND]
    while len(objects) < count:
        if pool and rng.random() < NEW_CLASS_PROB:
            extra = pool.pop(int(rng.integers(len(pool))))
            present.append(extra)
            if extra in _CONTEXT_BOUND:  # one context-bound class per image keeps rates exact
                pool = [c for c in pool if c not in _CONTEXT_BOUND]
        else:
            extra = present[int(rng.integers(len(present)))]
        objects.append(ObjectPlan(extra + 1))

    bound = [c for c in present if c in _CONTEXT_BOUND]
    if bound:
        typical, rate = _CONTEXT_BOUND[bound[0]]
        others = [c for c in CONTEXTS if c != typical]
        context = typical if rng.random() < rate else others[int(rng.integers(len(others)))]
    else:
        context = CONTEXTS[int(rng.integers(len(CONTEXTS)))]
    return ScenePlan(height=height, width=width, context=context, objects=tuple(objects))


def render_image(seed: int, split: str, index: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Plan and draw one image.

    Returns:
        (image uint8 (H, W, 3) RGB, mask uint8 (H, W) ids with 255 boundary band, context name).
    """
    rng = image_rng(seed, split, index)
    plan = plan_scene(rng)
    image, mask = render_scene(plan, CLASS_SPECS, rng)
    return image, mask, plan.context


def measure_cooccurrence(
    labels: Mapping[str, np.ndarray], contexts: Mapping[str, str]
) -> SynthStats:
    """Co-occurrence statistics of a set from its image labels and background contexts.

    Args:
        labels: name -> float (C,) image label (C = len(CLASS_SPECS)).
        contexts: name -> background context, for the same names.
    """
    names = sorted(labels)
    matrix = (
        np.stack([np.asarray(labels[n]) > 0 for n in names])
        if names
        else np.zeros((0, len(CLASS_SPECS)), dtype=bool)
    )
    ctx = np.asarray([contexts[n] for n in names])

    def ratio(num: int, den: int) -> float | None:
        return num / den if den else None

    pair_rates: dict[str, float | None] = {}
    any_pair = np.zeros(len(names), dtype=bool)
    for a, b in PAIR_RATES:
        ia, ib = matrix[:, _INDEX[a]], matrix[:, _INDEX[b]]
        both = ia & ib
        any_pair |= both
        pair_rates[f"{a}+{b}"] = ratio(int(both.sum()), int((ia | ib).sum()))
    context_rates: dict[str, float | None] = {}
    class_given_context: dict[str, float | None] = {}
    on_context = np.zeros(len(names), dtype=bool)
    for name, (typical, _) in CONTEXT_RATES.items():
        has = matrix[:, _INDEX[name]]
        on = has & (ctx == typical)
        on_context |= on
        context_rates[name] = ratio(int(on.sum()), int(has.sum()))
        class_given_context[name] = ratio(int(on.sum()), int((ctx == typical).sum()))
    count = max(len(names), 1)
    return SynthStats(
        images=len(names),
        pair_image_fraction=float(any_pair.sum()) / count,
        pair_rates=pair_rates,
        context_image_fraction=float(on_context.sum()) / count,
        context_rates=context_rates,
        class_given_context=class_given_context,
        mean_classes=float(matrix.sum()) / count,
    )


def is_synthetic_dataset(path: Path) -> bool:
    """True when `path` holds a dataset written by this module (its `synth.json` says so)."""
    try:
        manifest = json.loads((path / MANIFEST_FILENAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("generator") == GENERATOR_ID


def write_synthetic_dataset(
    out: Path,
    n_train: int,
    n_val: int,
    n_test: int = 0,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> SynthSummary:
    """Generate the benchmark into `out` (layout and parameters: module docstring).

    Files are written into a temporary sibling folder that is renamed to `out` at the end, so an
    interrupted run leaves no partial dataset. An existing synthetic dataset at `out` is replaced.

    Args:
        out: destination folder; must not exist, be empty, or hold a synthetic dataset.
        n_train: images in the train split (>= 1).
        n_val, n_test: images in the val and test splits (>= 0; 0 writes no list).
        seed: >= 0; one seed gives byte-identical files.
        progress: optional callback (images done, images total).

    Returns:
        Counts, class names and the co-occurrence statistics measured on what was written.

    Raises:
        DataError: a count or the seed out of range; `out` is a file, or a non-empty folder that is
            not a synthetic dataset (nothing is deleted then).
    """
    out = Path(out)
    _check_arguments(n_train, n_val, n_test, seed)
    _check_destination(out)
    start = time.perf_counter()
    with staged_folder(out) as tmp:
        stats, manifest = _write_all(
            tmp, {"train": n_train, "val": n_val, "test": n_test}, seed, progress
        )
        (tmp / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    seconds = time.perf_counter() - start
    logger.info("wrote %d synthetic images to %s in %.1f s", stats.images, out, seconds)
    return SynthSummary(
        root=out,
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        class_names=CLASS_NAMES,
        stats=stats,
        seconds=seconds,
    )


def _check_arguments(n_train: int, n_val: int, n_test: int, seed: int) -> None:
    for name, value, low in (
        ("n_train", n_train, 1),
        ("n_val", n_val, 0),
        ("n_test", n_test, 0),
        ("seed", seed, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DataError(f"synthetic dataset: {name} must be an integer >= {low}, got {value!r}")


def _check_destination(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is a file; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not is_synthetic_dataset(out):
        raise DataError(
            f"{out} is a non-empty folder that is not a cosa synthetic dataset (no "
            f"{MANIFEST_FILENAME}); refusing to overwrite it: choose a new or empty "
            "folder"
        )


def _write_all(
    root: Path,
    sizes: dict[str, int],
    seed: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[SynthStats, dict]:
    """Write every split's images, masks and lists, then labels and classes, into `root`."""
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    (root / SPLIT_DIR).mkdir(parents=True)
    palette = voc_palette(256)
    num_fg = len(CLASS_SPECS)
    labels: dict[str, np.ndarray] = {}
    contexts: dict[str, str] = {}
    foreground: list[float] = []
    total, done = sum(sizes.values()), 0
    for split in SPLITS:
        names = [f"{split}_{i:06d}" for i in range(sizes[split])]
        for index, name in enumerate(names):
            image, mask, context = render_image(seed, split, index)
            Image.fromarray(image).save(
                root / "JPEGImages" / f"{name}.jpg",
                format="JPEG",
                quality=JPEG_QUALITY,
                subsampling=JPEG_SUBSAMPLING,
            )
            palette_image(mask, palette).save(
                root / "SegmentationClass" / f"{name}.png", format="PNG"
            )
            labels[name] = labels_from_mask(mask, num_fg)
            contexts[name] = context
            valid = mask != IGNORE_INDEX
            foreground.append(float(((mask > 0) & valid).sum()) / max(int(valid.sum()), 1))
            done += 1
            if progress is not None:
                progress(done, total)
        if names:
            (root / SPLIT_DIR / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    np.save(root / LABELS_FILENAME, labels, allow_pickle=True)
    class_palette = voc_palette(len(CLASS_NAMES))
    (root / CLASSES_FILENAME).write_text(classes_file_text(CLASS_NAMES, class_palette))
    stats = measure_cooccurrence(labels, contexts)
    stats = SynthStats(**{**asdict(stats), "mean_foreground": float(np.mean(foreground))})
    manifest = {
        "generator": GENERATOR_ID,
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "splits": sizes,
        "classes": [asdict(c) for c in CLASS_SPECS],
        "pair_rates": [[a, b, r] for (a, b), r in PAIR_RATES.items()],
        "context_rates": [[name, ctx, r] for name, (ctx, r) in CONTEXT_RATES.items()],
        "contexts": contexts,
        "stats": asdict(stats),
    }
    return stats, manifest
