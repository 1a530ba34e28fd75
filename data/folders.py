"""Image folders: ``folder:PATH`` (a user's own set, torchvision's ImageFolder layout) and Tiny-ImageNet.

``folder:PATH`` reads ``PATH/train/<class>/<image>`` and ``PATH/test/<class>/<image>``: the class
names are the folder names under ``train/`` in sorted order (as torchvision's ``ImageFolder``
numbers them); ``test/`` may lack a class but may not add one. Images are read as RGB; the size of
the first training image is the set's size and an image of another size is resized to it.

Tiny-ImageNet is the ``tiny-imagenet-200`` folder of http://cs231n.stanford.edu/tiny-imagenet-200.zip:
``wnids.txt`` (200 class ids; classes numbered in sorted order, as ``ImageFolder`` on ``train/``
does), ``train/<wnid>/images/*.JPEG`` (500 per class) and ``val/images/*.JPEG`` with
``val/val_annotations.txt`` (file, wnid, box). The labelled ``val`` split is the test split, as
in the papers that report Tiny-ImageNet (its ``test/`` has no labels); its points are in the
annotation file's order. Images are 64x64.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from errors import UserError

from .images import FileImages, Source, image_size

FOLDER_LAYOUT = "PATH/train/<class>/<image> and PATH/test/<class>/<image>"
TINY_IMAGENET = "tiny-imagenet-200"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_CLASSES = 200
TINY_IMAGENET_SIZE = (64, 64)


def open_folder(path: str, download: bool = False) -> Source:
    """``folder:PATH``: classes from ``PATH/train``; ``UserError`` for a layout it cannot read."""
    root, where = Path(path), f"folder:{path}"
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise UserError(f"{where}: no folder {root / split} (the layout is {FOLDER_LAYOUT})")
    try:
        classes, class_to_idx = find_classes(str(root / "train"))
    except FileNotFoundError:
        raise UserError(f"{where}: {root / 'train'} has no class folders (the layout is {FOLDER_LAYOUT})") from None
    extra = sorted({d.name for d in os.scandir(root / "test") if d.is_dir()} - set(classes))
    if extra:
        raise UserError(f"{where}: test/ has class folder(s) {', '.join(extra[:4])} that train/ lacks: both splits "
                        "need the same class names")
    samples = {split: _samples(root / split, class_to_idx, where, allow_empty=split == "test")
               for split in ("train", "test")}
    if not samples["test"]:
        raise UserError(f"{where}: {root / 'test'} holds no images (extensions: {', '.join(IMG_EXTENSIONS)})")
    size = image_size(samples["train"][0][0])

    def make(train: bool, transform) -> FileImages:
        chosen = samples["train" if train else "test"]
        return FileImages([f for f, _ in chosen], [t for _, t in chosen], classes, size, transform)

    return Source(where, len(classes), (3, *size), make)


def _samples(folder: Path, class_to_idx: dict[str, int], where: str, allow_empty: bool) -> list[tuple[str, int]]:
    try:
        return make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=allow_empty)
    except FileNotFoundError as e:  # a class folder without a single image
        found = str(e).split(". ")[0][:160]  # "Found no valid file for the classes a, b"
        raise UserError(f"{where}: {found} in {folder} (images need one of the extensions "
                        f"{', '.join(IMG_EXTENSIONS)})") from None


# ------------------------------------------------------------------------------------ Tiny-ImageNet
def tiny_imagenet_root(data_dir: str | Path) -> Path:
    """``DATA_DIR/tiny-imagenet-200``, or ``DATA_DIR`` itself when it is that folder."""
    data_dir = Path(data_dir)
    return data_dir if (data_dir / "wnids.txt").is_file() else data_dir / TINY_IMAGENET


def open_tiny_imagenet(data_dir: str, download: bool = False) -> Source:
    """Tiny-ImageNet-200 under ``data_dir``; with ``download`` fetched and extracted there first."""
    root = tiny_imagenet_root(data_dir)
    if download and not (root / "wnids.txt").is_file():
        _download(Path(data_dir))
        root = tiny_imagenet_root(data_dir)
    wnids = _wnids(root)
    class_to_idx = {w: i for i, w in enumerate(wnids)}
    where = f"tiny-imagenet in {root}"
    train = _samples(root / "train", class_to_idx, where, allow_empty=False)
    val = _val_samples(root, class_to_idx)

    def make(is_train: bool, transform) -> FileImages:
        chosen = train if is_train else val
        return FileImages([f for f, _ in chosen], [t for _, t in chosen], wnids, TINY_IMAGENET_SIZE, transform)

    return Source("tiny-imagenet", TINY_IMAGENET_CLASSES, (3, *TINY_IMAGENET_SIZE), make)


def _wnids(root: Path) -> list[str]:
    path = root / "wnids.txt"
    if not path.is_file() or not (root / "train").is_dir() or not (root / "val").is_dir():
        raise UserError(f"tiny-imagenet not found: expected {root}{os.sep} holding wnids.txt, train/ and val/ (the "
                        f"extracted {TINY_IMAGENET_URL}); pass --data-dir <folder that contains {TINY_IMAGENET}/> "
                        "or add --download (needs internet)")
    wnids = sorted({line.strip() for line in path.read_text().splitlines() if line.strip()})
    if len(wnids) != TINY_IMAGENET_CLASSES:
        raise UserError(f"{path} lists {len(wnids)} classes, Tiny-ImageNet has {TINY_IMAGENET_CLASSES}: a damaged "
                        "copy? (another image folder reads with --dataset folder:PATH)")
    return wnids


def _val_samples(root: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """The labelled val split, in the order of ``val_annotations.txt``."""
    path = root / "val" / "val_annotations.txt"
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): Tiny-ImageNet's val labels are in it") from None
    samples: list[tuple[str, int]] = []
    for number, line in enumerate(lines, start=1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in class_to_idx:
            raise UserError(f"{path} line {number} is not 'FILE<TAB>WNID<TAB>box' with a wnid of wnids.txt: "
                            f"{line[:80]!r}")
        image = root / "val" / "images" / fields[0]
        if not image.is_file():
            raise UserError(f"{path} line {number} names {image}, which is missing: an incomplete copy?")
        samples.append((str(image), class_to_idx[fields[1]]))
    if not samples:
        raise UserError(f"{path} lists no images")
    return samples


def _download(data_dir: Path, url: Optional[str] = None) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    try:  # no MD5 given: none is published with the archive
        download_and_extract_archive(url or TINY_IMAGENET_URL, download_root=str(data_dir))
    except OSError as e:  # URLError is an OSError
        raise UserError(f"could not download tiny-imagenet into {data_dir} ({type(e).__name__}: {e}); fetch "
                        f"{TINY_IMAGENET_URL} by hand and extract it there") from None
