"""Image folders for the deep clustering network.

A data folder holds::

    train/       images, flat or in sub-folders (names are ignored: unlabelled)
    test/        optional: one sub-folder per class, for evaluation
    reference/   optional: a few images per class, for naming the clusters:
                 files named after their class (cat.png, cat_2.jpg) and/or
                 one sub-folder per class

Images of any size and colour mode are decoded with ``tf.data`` in
parallel, turned upright as their EXIF orientation says (phone photos),
laid over white where they are transparent, converted to grayscale (or
RGB), resized to ``image_size`` and scaled to [0, 1]. Files that are not
images (by extension) are skipped with a warning that counts them; an
image that fails to decode is skipped and named. Keras'
``image_dataset_from_directory`` would stop at the first corrupt file and
pass over other files silently, so the folders are listed here and decoded
with ``tf.io.decode_image`` under ``ignore_errors``.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
COLORS = {"grayscale": 1, "rgb": 3}


@dataclass
class ImageSet:
    """Decoded images of one folder: ``x`` (N, H, W, C) float32 in [0, 1]."""

    x: np.ndarray
    paths: list[str]
    labels: np.ndarray | None = None   # class index per image (labelled folders)
    classes: list[str] = field(default_factory=list)
    skipped: int = 0                   # non-image files
    corrupt: list[str] = field(default_factory=list)


def warn(message: str):
    print(f"warning: {message}", file=sys.stderr)


def _list_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def exif_orientation(path) -> int:
    """The EXIF orientation (1-8) of a JPEG or PNG file; 1 (upright) when it
    has none or it cannot be read. Reads the header only (PIL, lazily)."""
    if Path(path).suffix.lower() not in (".jpg", ".jpeg", ".png"):
        return 1
    from PIL import Image

    try:
        with Image.open(path) as image:
            code = int(image.getexif().get(0x0112, 1))
    except Exception:  # not an image, or a damaged header: the decoder will say so
        return 1
    return code if 1 <= code <= 8 else 1


def _upright(tf, image, code):
    """``image`` turned as EXIF orientation ``code`` asks (as PIL's exif_transpose)."""
    turns = [lambda: image,                                           # 0: not used
             lambda: image,                                           # 1: upright already
             lambda: tf.image.flip_left_right(image),                 # 2: mirror
             lambda: tf.image.rot90(image, 2),                        # 3: turn 180 degrees
             lambda: tf.image.flip_up_down(image),                    # 4: flip
             lambda: tf.image.transpose(image),                       # 5: transpose
             lambda: tf.image.rot90(image, 3),                        # 6: turn 90 degrees clockwise
             lambda: tf.image.rot90(tf.image.transpose(image), 2),    # 7: transverse
             lambda: tf.image.rot90(image, 1)]                        # 8: turn 90 degrees anticlockwise
    return tf.switch_case(code, turns)


def decode_images(paths: list[Path], image_size, color: str = "grayscale"):
    """Decode, turn upright, convert and resize images in parallel; returns
    (x, kept, corrupt)."""
    import tensorflow as tf

    channels = COLORS[color]
    size = tuple(int(v) for v in image_size)

    def load(path, orientation):
        image = tf.io.decode_image(tf.io.read_file(path), expand_animations=False)  # its own channels, 1-4
        image = tf.image.convert_image_dtype(image, tf.float32)  # [0, 1]
        n = tf.shape(image)[-1]
        alpha = tf.cond(n % 2 == 0, lambda: image[..., -1:], lambda: tf.ones_like(image[..., :1]))
        colour = tf.cond(n % 2 == 0, lambda: image[..., :-1], lambda: image)  # grey+alpha, RGBA: drop it
        colour = tf.cond(tf.shape(colour)[-1] == 1, lambda: tf.tile(colour, [1, 1, 3]), lambda: colour)
        colour.set_shape([None, None, 3])
        image = colour * alpha + (1.0 - alpha)  # transparent parts over white
        image = _upright(tf, image, orientation)
        if channels == 1:
            image = tf.image.rgb_to_grayscale(image)
        return tf.image.resize(image, size, antialias=True), path

    names = [str(p) for p in paths]
    if not names:
        return np.zeros((0, *size, channels), np.float32), [], []
    orientations = np.array([exif_orientation(p) for p in names], np.int32)
    ds = (tf.data.Dataset.from_tensor_slices((names, orientations))
          .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .ignore_errors())
    images, kept = [], []
    for batch, batch_paths in ds.batch(256):
        images.append(np.clip(batch.numpy(), 0.0, 1.0))
        kept += [p.decode() for p in batch_paths.numpy()]
    done = set(kept)
    corrupt = [n for n in names if n not in done]
    x = np.concatenate(images) if images else np.zeros((0, *size, channels), np.float32)
    return x, kept, corrupt


def typical_side(folder, largest: int = 64, sample: int = 1000) -> int:
    """The median of the images' larger sides under ``folder`` (read from
    the headers of at most ``sample`` of them, evenly spaced in name order),
    at most ``largest``; ``largest`` when none can be read."""
    from PIL import Image

    images = [p for p in _list_files(Path(folder)) if p.suffix.lower() in IMAGE_EXTENSIONS]
    step = max(1, len(images) // sample)
    sides = []
    for p in images[::step]:
        try:
            with Image.open(p) as image:
                sides.append(max(image.size))
        except Exception:  # not readable: the decoder will say so
            continue
    return int(min(largest, np.median(sides))) if sides else largest


def load_images(folder, image_size, color: str = "grayscale", labelled: bool = False,
                name: str | None = None) -> ImageSet:
    """Every image under ``folder``; with ``labelled``, one sub-folder per class."""
    folder = Path(folder)
    name = name or folder.name
    files = _list_files(folder)
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    skipped = len(files) - len(images)
    if skipped:
        files_are = "file that is" if skipped == 1 else "files that are"
        warn(f"{name}/: skipped {skipped} {files_are} not an image ({', '.join(IMAGE_EXTENSIONS)})")
    classes = []
    if labelled:
        loose = [p for p in images if p.parent == folder]
        if loose:
            warn(f"{name}/: {len(loose)} images directly in the folder have no class sub-folder; ignored")
        images = [p for p in images if p.parent != folder]
        classes = sorted({p.relative_to(folder).parts[0] for p in images})
    x, kept, corrupt = decode_images(images, image_size, color)
    for c in corrupt:
        warn(f"skipped corrupt image {c}")
    labels = None
    if labelled:
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[Path(p).relative_to(folder).parts[0]] for p in kept], dtype=np.int64)
    return ImageSet(x, kept, labels, classes, skipped, corrupt)


_NUMBERED = re.compile(r"^(.*?)[_-]\d+$")


def reference_class(path: Path, folder: Path, known=()) -> str:
    """Class of a reference image: its sub-folder, else its file name
    without extension and without a trailing _N or -N (cat_2.png -> cat),
    unless the whole name is one of the ``known`` classes (test/'s: a class
    ``covid-19`` keeps its number; covid-19_2.png is covid-19 too)."""
    rel = path.relative_to(folder)
    if len(rel.parts) > 1:
        return rel.parts[0]
    if path.stem in known:
        return path.stem
    match = _NUMBERED.match(path.stem)
    return match.group(1) if match else path.stem


def load_references(folder, image_size, color: str = "grayscale", known=()) -> ImageSet:
    """Reference images with their classes (files named after a class, or
    class sub-folders); ``known``: the classes of test/, see :func:`reference_class`."""
    folder = Path(folder)
    refs = load_images(folder, image_size, color, labelled=False, name=folder.name)
    names = [reference_class(Path(p), folder, known) for p in refs.paths]
    refs.classes = sorted(set(names))
    refs.labels = np.array([refs.classes.index(n) for n in names], dtype=np.int64)
    return refs


@dataclass
class ImageFolders:
    train: ImageSet
    test: ImageSet | None
    reference: ImageSet | None


def load_folders(root, image_size=(160, 160), color: str = "grayscale", naming: bool = True) -> ImageFolders:
    """``train/`` (required), ``test/`` and ``reference/`` (optional) of ``root``.
    ``naming``: the references name the clusters (bin/dcn), so a test class
    without references is warned of; bin/rswnet scores by Hungarian matching."""
    root = Path(root)
    if color not in COLORS:
        raise DataError(f"unknown colour mode '{color}'; choose grayscale or rgb")
    if not root.is_dir():
        raise DataError(f"data folder {root} not found")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{root} has no train/ folder (expected train/, and optionally test/ and reference/)")
    train = load_images(train_dir, image_size, color, name="train")
    if len(train.x) == 0:
        raise DataError(f"no readable images in {train_dir} (non-image files: {train.skipped}, "
                        f"corrupt images: {len(train.corrupt)}); supported: {', '.join(IMAGE_EXTENSIONS)}")
    test = None
    if (root / "test").is_dir():
        test = load_images(root / "test", image_size, color, labelled=True, name="test")
        if len(test.x) == 0:
            warn(f"{root / 'test'} has no class sub-folders with images; no evaluation")
            test = None
    reference = None
    if (root / "reference").is_dir():
        reference = load_references(root / "reference", image_size, color,
                                    known=test.classes if test is not None else ())
        if len(reference.x) == 0:
            warn(f"{root / 'reference'} has no readable images; clusters stay unnamed")
            reference = None
    if naming and test is not None and reference is not None:
        missing = sorted(set(test.classes) - set(reference.classes))
        if missing:
            warn(f"test classes without reference images: {', '.join(missing)}; "
                 "their test images can only count as errors")
    return ImageFolders(train, test, reference)


def load_image_files(paths, image_size, color: str = "grayscale"):
    """Images named on a command line (for predictions); missing files are errors."""
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"image file{'s' if len(missing) > 1 else ''} not found: {', '.join(missing)}")
    x, kept, corrupt = decode_images(paths, image_size, color)
    if not kept:
        raise DataError(f"none of the images could be read ({', '.join(map(str, corrupt[:3]))}"
                        f"{', ...' if len(corrupt) > 3 else ''}): use PNG, JPEG, BMP or GIF files")
    for c in corrupt:
        warn(f"skipped unreadable image {c}")
    return x, kept


def describe(folders: ImageFolders) -> str:
    parts = [f"train {len(folders.train.x)} images"]
    if folders.test is not None:
        parts.append(f"test {len(folders.test.x)} images in {len(folders.test.classes)} classes")
    if folders.reference is not None:
        ref = folders.reference
        parts.append(f"reference {len(ref.x)} images of {len(ref.classes)} classes")
    return "; ".join(parts)

