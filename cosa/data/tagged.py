"""A user's own data: photos and a tags file, no masks needed (DESIGN.md "Tagged folder").

```
ROOT/images/**/*.jpg|.jpeg|.png|.webp|.bmp|.tif|.tiff   any depth, suffix in any case
ROOT/labels.csv  or  ROOT/labels.jsonl                   the tags of each image (one of the two)
ROOT/classes.txt                                         optional: foreground classes in id order
ROOT/masks/<image path with .png>                        optional, for any subset of the images
```

`labels.csv` (UTF-8 with or without BOM, LF or CRLF) starts with a header row. Long form: columns
`image` (path relative to `images/`) and `tags` (class names separated by `;`, spaces around them
ignored; empty = background only), optional `split` (`train`, `val` or `test`); other columns are
ignored. Wide form: `image`, optional `split`, and one 0/1 column per class. `labels.jsonl`: one
object per line, `{"image": "...", "tags": ["...", ...], "split": "train"}` (`split` optional, other
keys ignored).

Class ids: background is id 0; the foreground classes are `classes.txt` in line order (ids 1, 2,
...) when it exists, else the sorted union of all tags. A trained model stores its class list;
evaluation and pseudo-labelling open the folder with that list, so ids never change after training.

Splits: the `split` column when the file has one (then every row needs it). Without it, a seeded
split stratified by class: each image joins the group of its rarest tag (no tags: a group of its
own), and `round(val_fraction * n)` images of each group, drawn by the seed, become `val`. The
same labels file and seed always give the same split.

Masks: `masks/a/b.png` belongs to `images/a/b.jpg`; palette or grey PNG of class ids, 255 = ignore,
at the image's displayed size (after its EXIF orientation).

Reading collects problems (`cosa.data.problems`) instead of stopping at the first one; image and
mask contents are checked by `cosa.data.check`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from cosa.data.classes import IGNORE_INDEX, voc_palette
from cosa.data.index import DatasetIndex, Sample
from cosa.data.problems import Problem, error, raise_on_errors, warning
from cosa.errors import ConfigError, DataError, did_you_mean
from cosa.files import write_text_atomic
from cosa.images import is_image_name

IMAGES_DIR = "images"
MASKS_DIR = "masks"
CSV_FILENAME = "labels.csv"
JSONL_FILENAME = "labels.jsonl"
CLASS_LIST_FILENAME = "classes.txt"
TAG_SEPARATOR = ";"
SPLITS = ("train", "val", "test")
BACKGROUND = "background"
DEFAULT_VAL_FRACTION = 0.1
MAX_FOREGROUND = IGNORE_INDEX - 1  # ids 1..254; 255 means "ignore" in masks
PATH_SIMILARITY = 0.8  # "did you mean" for image paths: "dog_01.jpg" for "dog_1.jpg", not "e.jpg"


@dataclass(frozen=True)
class TaggedRow:
    """One image of the labels file.

    Attributes:
        image: path relative to `images/`, '/'-separated, e.g. "dogs/001.jpg".
        tags: class names in the order written, without duplicates; () = background only.
        split: "train", "val" or "test"; assigned by the seeded split when the file has no
            split column.
        line: 1-based line of the row in the labels file.
    """

    image: str
    tags: tuple[str, ...]
    split: str
    line: int


@dataclass(frozen=True)
class TaggedFolder:
    """A read tagged folder: its valid rows, class list, masks and every problem found.

    Attributes:
        root: the folder.
        labels_file: `labels.csv` or `labels.jsonl` (None when neither exists).
        class_names: incl. background at index 0.
        class_source: "classes.txt", "tags" (sorted union) or "model" (given by a checkpoint).
        rows: the rows whose image exists and whose tags are known, in file order.
        split_derived: True when the splits were drawn (no split column).
        masks: image -> its mask file, for the images that have one.
        unlisted: images under `images/` that the labels file does not list.
        problems: every problem found, by file and line.
    """

    root: Path
    labels_file: Path | None
    class_names: tuple[str, ...]
    class_source: str
    rows: tuple[TaggedRow, ...]
    split_derived: bool
    masks: dict[str, Path]
    unlisted: tuple[str, ...]
    problems: tuple[Problem, ...]

    def split_names(self) -> list[str]:
        """The splits that hold at least one image, in `SPLITS` order."""
        present = {row.split for row in self.rows}
        return [s for s in SPLITS if s in present]

    def index(self, split: str) -> DatasetIndex:
        """The `DatasetIndex` of `split` (the VOC colour map as palette)."""
        palette = voc_palette(len(self.class_names))
        return DatasetIndex(
            root=self.root,
            kind="tagged",
            split=split,
            class_names=self.class_names,
            palette=tuple((int(r), int(g), int(b)) for r, g, b in palette),
            samples=self.samples(split),
        )

    def samples(self, split: str) -> tuple[Sample, ...]:
        """The samples of `split`, in labels-file order (label vectors in class-id order)."""
        ids = {name: i for i, name in enumerate(self.class_names[1:])}
        samples = []
        for row in self.rows:
            if row.split != split:
                continue
            label = np.zeros(len(ids), dtype=np.float32)
            label[[ids[t] for t in row.tags]] = 1.0
            label.setflags(write=False)
            samples.append(
                Sample(
                    name=row.image,
                    image_path=self.root / IMAGES_DIR / row.image,
                    mask_path=self.masks.get(row.image),
                    label=label,
                )
            )
        return tuple(samples)


def is_tagged_folder(root: Path) -> bool:
    """True when `root` holds an `images/` folder or a tags file (the layout's markers)."""
    return (
        (root / IMAGES_DIR).is_dir()
        or (root / CSV_FILENAME).is_file()
        or (root / JSONL_FILENAME).is_file()
    )


def mask_name(image: str) -> str:
    """The mask of an image, relative to `masks/`: "a/b.jpg" -> "a/b.png"."""
    return str(PurePosixPath(image).with_suffix(".png"))


def open_tagged(
    root: Path,
    split: str,
    class_names: Sequence[str] | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = 0,
) -> DatasetIndex:
    """Open one split of a tagged folder.

    Args:
        root: the folder.
        split: "train", "val" or "test".
        class_names: the class list incl. background that ids must follow (a trained model's);
            None = `classes.txt`, else the sorted union of the tags.
        val_fraction, split_seed: the seeded split, used when the labels have no split column.

    Raises:
        DataError: any error of `read_tagged_folder` (the first few quoted), or an unknown split.
        ConfigError: `val_fraction` outside [0, 1).
    """
    folder = read_tagged_folder(root, class_names, val_fraction, split_seed)
    raise_on_errors(folder.problems, root)
    if split not in SPLITS:
        raise DataError(
            f"{root} is a tagged folder: its splits are {', '.join(SPLITS)}, not {split!r}; set "
            f"data.train_split / data.val_split to one of them (e.g. --set data.train_split=train)"
        )
    return folder.index(split)


def read_tagged_folder(
    root: Path,
    class_names: Sequence[str] | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = 0,
) -> TaggedFolder:
    """Read a tagged folder's labels, class list, image listing and masks; collect every problem.

    Image and mask contents (decodable, sizes, ids) are not read here: see `cosa.data.check`.

    Args:
        root: the folder.
        class_names: incl. background; a trained model's class list (then `classes.txt`, if any,
            must agree with it). None = `classes.txt`, else the sorted union of the tags.
        val_fraction: share of each class group drawn into `val` when there is no split column.
        split_seed: seed of that draw.

    Raises:
        ConfigError: `val_fraction` outside [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must lie in [0, 1), got {val_fraction}")
    problems: list[Problem] = []
    images_dir = root / IMAGES_DIR
    on_disk = _list_images(images_dir, problems)
    labels_file = _labels_file(root, problems)
    # Where row problems are reported; with no labels file there are no rows to report.
    labels_path = labels_file if labels_file is not None else root / CSV_FILENAME
    raw_rows = _parse_labels(labels_file, problems) if labels_file is not None else []
    rows = _keep_listed(raw_rows, on_disk, labels_path, problems)
    listed = {row.image for row in rows}
    unlisted = tuple(sorted(set(on_disk) - {_normalise_image(r.image) for r in raw_rows}))
    if labels_file is not None:
        problems.extend(
            warning(
                images_dir / image,
                None,
                f"is not listed in {labels_file.name}; it is not "
                f"used (add a row for it, or move it out of {IMAGES_DIR}/)",
            )
            for image in unlisted
        )
    names, source = _class_list(root, rows, class_names, labels_path, problems)
    rows = _check_tags(rows, names, labels_path, problems)
    has_splits = any(row.split is not None for row in raw_rows)
    tagged_rows, derived = _splits(
        rows, has_splits, labels_path, val_fraction, split_seed, problems
    )
    masks = _masks(root, tagged_rows, listed, problems)
    return TaggedFolder(
        root=root,
        labels_file=labels_file,
        class_names=names,
        class_source=source,
        rows=tuple(tagged_rows),
        split_derived=derived,
        masks=masks,
        unlisted=unlisted,
        problems=tuple(sorted(problems, key=lambda p: (str(p.file), p.line or 0))),
    )


# --------------------------------------------------------------------------------- split drawing


def assign_splits(
    images: Sequence[tuple[str, Sequence[str]]], val_fraction: float, seed: int
) -> dict[str, str]:
    """Draw a validation split stratified by class.

    Each image joins the group of its rarest tag (the tag with the fewest images; ties by name),
    images without tags a group of their own; in each group `floor(val_fraction * n + 0.5)` images,
    drawn by `seed`, go to "val", the rest to "train". The result depends only on the set of
    (image, tags) pairs and the seed, not on their order.

    Args:
        images: (image name, tags) pairs; names unique.
        val_fraction: in [0, 1).
        seed: any non-negative integer.

    Returns:
        image name -> "train" or "val".
    """
    counts = Counter(tag for _, tags in images for tag in set(tags))
    groups: dict[str, list[str]] = defaultdict(list)
    for image, tags in images:
        key = min(tags, key=lambda t: (counts[t], t)) if tags else ""
        groups[key].append(image)
    rng = np.random.default_rng(seed)
    splits: dict[str, str] = {}
    for key in sorted(groups):
        members = sorted(groups[key])
        order = rng.permutation(len(members))
        n_val = math.floor(val_fraction * len(members) + 0.5)
        for rank, index in enumerate(order):
            splits[members[index]] = "val" if rank < n_val else "train"
    return splits


# ------------------------------------------------------------------------------------ writing


def write_labels(out: Path, rows: Sequence[TaggedRow], class_names: Sequence[str]) -> None:
    """Write `classes.txt` and `labels.csv` (long form, with the split column) atomically.

    Args:
        out: the tagged folder.
        rows: image, tags and split of every image, in the order to write.
        class_names: incl. background at index 0 (background is not written: it is implicit).
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "tags", "split"])
    for row in rows:
        writer.writerow([row.image, TAG_SEPARATOR.join(row.tags), row.split])
    write_text_atomic(out / CLASS_LIST_FILENAME, "".join(f"{n}\n" for n in class_names[1:]))
    write_text_atomic(out / CSV_FILENAME, buffer.getvalue())


# -------------------------------------------------------------------------------------- reading


def _list_images(images_dir: Path, problems: list[Problem]) -> list[str]:
    """Images under `images_dir`, relative and '/'-separated, sorted; hidden entries skipped."""
    if not images_dir.is_dir():
        problems.append(
            error(images_dir, None, "does not exist; put the photos under images/ (any depth)")
        )
        return []
    found: list[str] = []
    visited: set[str] = set()

    def on_error(exc: OSError) -> None:
        problems.append(
            error(
                Path(exc.filename or images_dir),
                None,
                f"cannot be listed ({exc.strerror or exc}); fix its permissions",
            )
        )

    for dirpath, dirnames, filenames in os.walk(images_dir, onerror=on_error, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink cycle
            dirnames.clear()
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath).relative_to(images_dir)
        for name in filenames:
            if not name.startswith(".") and is_image_name(name):
                found.append((base / name).as_posix())
    return sorted(found)


def _labels_file(root: Path, problems: list[Problem]) -> Path | None:
    csv_path, jsonl_path = root / CSV_FILENAME, root / JSONL_FILENAME
    if csv_path.is_file() and jsonl_path.is_file():
        problems.append(
            error(root, None, f"holds both {CSV_FILENAME} and {JSONL_FILENAME}; keep one of them")
        )
        return None
    if csv_path.is_file():
        return csv_path
    if jsonl_path.is_file():
        return jsonl_path
    problems.append(
        error(
            csv_path,
            None,
            f"does not exist: write the tags of each image in "
            f"{CSV_FILENAME} (header: image,tags) or {JSONL_FILENAME}",
        )
    )
    return None


@dataclass(frozen=True)
class _RawRow:
    image: str
    tags: tuple[str, ...]
    split: str | None  # None: no split column (CSV) or key (JSONL line); "" an empty value
    line: int


def _read_text(path: Path, problems: list[Problem]) -> str | None:
    """The file as text: UTF-8 with or without BOM; any line ending."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.append(error(path, None, f"cannot be read ({exc.strerror or exc})"))
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        problems.append(
            error(
                path,
                line,
                f"is not UTF-8 text (byte {data[exc.start]:#04x}); save the file as UTF-8",
            )
        )
        return None


def _parse_labels(path: Path, problems: list[Problem]) -> list[_RawRow]:
    text = _read_text(path, problems)
    if text is None:
        return []
    rows = (
        _parse_csv(path, text, problems)
        if path.suffix == ".csv"
        else _parse_jsonl(path, text, problems)
    )
    if not rows and not any(p.file == path and p.severity == "error" for p in problems):
        problems.append(error(path, None, "lists no images; add one row per image"))
    return rows


def _split_tags(text: str) -> tuple[str, ...]:
    """`"cat; dog ;"` -> ("cat", "dog"): split at `;`, spaces, empties and repeats dropped."""
    tags = (t.strip() for t in text.split(TAG_SEPARATOR))
    return tuple(dict.fromkeys(t for t in tags if t))


def _parse_csv(path: Path, text: str, problems: list[Problem]) -> list[_RawRow]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        records = [(reader.line_num, record) for record in reader]
    except csv.Error as exc:
        problems.append(error(path, reader.line_num, f"is not valid CSV ({exc}); check its quotes"))
        return []
    records = [(n, r) for n, r in records if any(cell.strip() for cell in r)]
    if not records:
        return []
    header_line, header = records[0]
    columns = [c.strip() for c in header]
    lowered = [c.lower() for c in columns]
    if "image" not in lowered:
        problems.append(
            error(
                path,
                header_line,
                f"the header {columns} has no 'image' column; "
                "start the file with `image,tags` (or `image,split,tags`), or "
                "`image` and one 0/1 column per class",
            )
        )
        return []
    repeated = sorted({c for c in lowered if lowered.count(c) > 1})
    if repeated:
        problems.append(
            error(
                path,
                header_line,
                f"the header names {repeated} more than once; give every column its own name",
            )
        )
        return []
    image_col = lowered.index("image")
    split_col = lowered.index("split") if "split" in lowered else None
    wide = "tags" not in lowered
    class_cols = [i for i in range(len(columns)) if i not in (image_col, split_col)] if wide else []
    if wide and not class_cols:
        problems.append(
            error(
                path,
                header_line,
                "has neither a 'tags' column nor class columns; "
                "add `tags` (class names separated by ';') or one 0/1 column per "
                "class",
            )
        )
        return []
    tags_col = None if wide else lowered.index("tags")
    rows: list[_RawRow] = []
    for line, record in records[1:]:
        if len(record) != len(columns):
            problems.append(
                error(
                    path,
                    line,
                    f"has {len(record)} fields, the header has "
                    f"{len(columns)}; quote fields that contain commas",
                )
            )
            continue
        split = record[split_col].strip().lower() if split_col is not None else None
        if tags_col is not None:
            tags = _split_tags(record[tags_col])
        else:
            tags, bad = _wide_tags(record, class_cols, columns)
            if bad:
                problems.append(
                    error(
                        path,
                        line,
                        f"column {bad[0]!r} holds {bad[1]!r}; wide-form class columns hold 0 or 1",
                    )
                )
                continue
        rows.append(_RawRow(record[image_col], tags, split, line))
    return rows


def _wide_tags(
    record: list[str], class_cols: list[int], columns: list[str]
) -> tuple[tuple[str, ...], tuple[str, str] | None]:
    tags = []
    for i in class_cols:
        value = record[i].strip()
        if value == "1":
            tags.append(columns[i])
        elif value != "0":
            return (), (columns[i], value)
    return tuple(tags), None


def _parse_jsonl(path: Path, text: str, problems: list[Problem]) -> list[_RawRow]:
    fix = 'write one object per line: {"image": "a.jpg", "tags": ["cat"], "split": "train"}'
    rows: list[_RawRow] = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as exc:
            problems.append(error(path, line, f"is not valid JSON ({exc.msg}); {fix}"))
            continue
        if not isinstance(item, dict):
            problems.append(
                error(path, line, f"holds a {type(item).__name__}, not an object; {fix}")
            )
            continue
        image, tags, split = item.get("image"), item.get("tags"), item.get("split")
        if not isinstance(image, str):
            problems.append(error(path, line, f"needs an 'image' string; {fix}"))
            continue
        if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
            problems.append(
                error(
                    path,
                    line,
                    f"needs 'tags' as a list of strings ([] for a background-only image); {fix}",
                )
            )
            continue
        if split is not None and not isinstance(split, str):
            problems.append(error(path, line, f"'split' must be a string or absent; {fix}"))
            continue
        clean = tuple(dict.fromkeys(t.strip() for t in tags if t.strip()))
        rows.append(_RawRow(image, clean, split.strip().lower() if split else None, line))
    return rows


def _normalise_image(image: str) -> str | None:
    """A row's image as a '/'-separated path inside `images/`, or None when it points outside."""
    text = image.strip().replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    path = PurePosixPath(text)
    if not text or path.is_absolute() or ".." in path.parts:
        return None
    return str(path)


def _keep_listed(
    raw_rows: list[_RawRow], on_disk: list[str], labels_file: Path, problems: list[Problem]
) -> list[_RawRow]:
    """Rows whose image is a unique, existing path inside `images/`."""
    existing = set(on_disk)
    first_line: dict[str, int] = {}
    kept: list[_RawRow] = []
    for row in raw_rows:
        image = _normalise_image(row.image)
        if image is None:
            problems.append(
                error(
                    labels_file,
                    row.line,
                    f"image {row.image!r} is not a path inside "
                    f"{IMAGES_DIR}/; write it relative to {IMAGES_DIR}/ "
                    "(e.g. dogs/001.jpg)",
                )
            )
            continue
        if image in first_line:
            problems.append(
                error(
                    labels_file,
                    row.line,
                    f"{image} is listed twice (first on line "
                    f"{first_line[image]}); remove one of the rows",
                )
            )
            continue
        first_line[image] = row.line
        if image not in existing:
            problems.append(error(labels_file, row.line, _missing_image_message(image, on_disk)))
            continue
        kept.append(_RawRow(image, row.tags, row.split, row.line))
    return kept


def _missing_image_message(image: str, on_disk: list[str]) -> str:
    hint = ""
    prefix = f"{IMAGES_DIR}/"
    if image.startswith(prefix) and image[len(prefix) :] in set(on_disk):
        hint = f" (paths are relative to {IMAGES_DIR}/: write {image[len(prefix) :]})"
    elif not is_image_name(image):
        hint = " (not an image suffix: .jpg .jpeg .png .webp .bmp .tif .tiff)"
    else:
        hint = did_you_mean(image, on_disk, cutoff=PATH_SIMILARITY)
    return (
        f"image {image} is listed but {IMAGES_DIR}/{image} does not exist{hint}; restore the "
        "file or remove the row"
    )


def _read_class_list(path: Path, problems: list[Problem]) -> tuple[str, ...] | None:
    text = _read_text(path, problems)
    if text is None:
        return None
    names: list[str] = []
    seen: dict[str, int] = {}
    ok = True
    for line, raw in enumerate(text.splitlines(), start=1):
        name = raw.strip()
        if not name:
            continue
        if name == BACKGROUND:
            if names:
                problems.append(
                    error(
                        path,
                        line,
                        f"'{BACKGROUND}' is id 0 and implicit; remove "
                        "this line (or make it the first line)",
                    )
                )
                ok = False
            continue
        if TAG_SEPARATOR in name:
            problems.append(
                error(
                    path,
                    line,
                    f"class name {name!r} contains {TAG_SEPARATOR!r}, "
                    "which separates tags; rename the class",
                )
            )
            ok = False
        if name in seen:
            problems.append(
                error(
                    path,
                    line,
                    f"class {name!r} is listed twice (first on line {seen[name]}); remove one",
                )
            )
            ok = False
        seen.setdefault(name, line)
        names.append(name)
    if not names:
        problems.append(error(path, None, "lists no classes; write one class name per line"))
        return None
    if len(names) > MAX_FOREGROUND:
        problems.append(
            error(
                path,
                None,
                f"lists {len(names)} classes; at most {MAX_FOREGROUND} "
                "fit (ids 1..254, 255 = ignore)",
            )
        )
        return None
    return (BACKGROUND, *names) if ok else None


def _class_list(
    root: Path,
    rows: list[_RawRow],
    given: Sequence[str] | None,
    labels_file: Path,
    problems: list[Problem],
) -> tuple[tuple[str, ...], str]:
    class_file = root / CLASS_LIST_FILENAME
    from_file = _read_class_list(class_file, problems) if class_file.is_file() else None
    if given is not None:
        given = tuple(given)
        if from_file is not None and from_file != given:
            problems.append(
                error(
                    class_file,
                    None,
                    f"lists {list(from_file[1:])} but the model "
                    f"was trained on {list(given[1:])}; class ids must not change "
                    "after training: restore the model's list or retrain",
                )
            )
        return given, "model"
    if from_file is not None:
        return from_file, CLASS_LIST_FILENAME
    union = sorted({t for row in rows for t in row.tags} - {BACKGROUND})
    by_folded: dict[str, list[str]] = defaultdict(list)
    for name in union:
        by_folded[name.casefold()].append(name)
    for variants in by_folded.values():
        if len(variants) > 1:
            problems.append(
                warning(
                    labels_file,
                    None,
                    f"tags {variants} differ only in case and "
                    "become separate classes; spell them one way",
                )
            )
    if len(union) > MAX_FOREGROUND:
        problems.append(
            error(
                labels_file,
                None,
                f"the tags name {len(union)} classes; at "
                f"most {MAX_FOREGROUND} fit (ids 1..254, 255 = ignore)",
            )
        )
        union = union[:MAX_FOREGROUND]
    if not union and rows:
        problems.append(
            error(labels_file, None, "no image has a tag; tag the images with the classes to learn")
        )
    return (BACKGROUND, *union), "tags"


def _check_tags(
    rows: list[_RawRow], names: tuple[str, ...], labels_file: Path, problems: list[Problem]
) -> list[_RawRow]:
    """Rows whose tags are all known classes; each unknown tag is an error with a suggestion."""
    known = set(names[1:])
    source = CLASS_LIST_FILENAME if len(names) > 1 else "the class list"
    kept = []
    for row in rows:
        bad = [t for t in row.tags if t not in known]
        for tag in bad:
            if tag == BACKGROUND:
                message = (
                    f"tag '{BACKGROUND}' is implicit (id 0); leave the tags empty for a "
                    "background-only image"
                )
            else:
                message = (
                    f"tag {tag!r} is not a class{did_you_mean(tag, known)}; fix the tag or "
                    f"add the class to {source}"
                )
            problems.append(error(labels_file, row.line, message))
        if not bad:
            kept.append(row)
    return kept


def _splits(
    rows: list[_RawRow],
    has_splits: bool,
    labels_file: Path,
    val_fraction: float,
    seed: int,
    problems: list[Problem],
) -> tuple[list[TaggedRow], bool]:
    """Give every row its split: the file's split column (`has_splits`: a CSV split column, or a
    JSONL line with a split), or the seeded stratified draw."""
    if not has_splits:
        drawn = assign_splits([(r.image, r.tags) for r in rows], val_fraction, seed)
        return [TaggedRow(r.image, r.tags, drawn[r.image], r.line) for r in rows], True
    kept = []
    for row in rows:
        if row.split not in SPLITS:
            value = "empty" if not row.split else repr(row.split)
            problems.append(
                error(
                    labels_file,
                    row.line,
                    f"split is {value}; write train, val or test (once the file "
                    "has a split column, every row needs one)",
                )
            )
            continue
        kept.append(TaggedRow(row.image, row.tags, row.split, row.line))
    return kept, False


def _masks(
    root: Path, rows: list[TaggedRow], listed: set[str], problems: list[Problem]
) -> dict[str, Path]:
    """image -> mask file for the images that have one; clashes and orphans reported."""
    owner: dict[str, str] = {}
    for row in rows:
        name = mask_name(row.image)
        if name in owner:
            problems.append(
                error(
                    root / IMAGES_DIR / row.image,
                    None,
                    f"shares the mask name "
                    f"{MASKS_DIR}/{name} with {owner[name]}; rename one of the two",
                )
            )
            continue
        owner[name] = row.image
    masks_dir = root / MASKS_DIR
    if not masks_dir.is_dir():
        return {}
    found: dict[str, Path] = {}
    listed_masks = {mask_name(image) for image in listed}
    for dirpath, dirnames, filenames in os.walk(masks_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath).relative_to(masks_dir)
        for file in sorted(filenames):
            if file.startswith("."):
                continue
            name = (base / file).as_posix()
            if name in owner:
                found[owner[name]] = masks_dir / name
            elif name not in listed_masks:
                problems.append(
                    warning(
                        masks_dir / name,
                        None,
                        "belongs to no listed image "
                        f"(expected {IMAGES_DIR}/<same path>.<image suffix>); "
                        "it is not used",
                    )
                )
    return found
