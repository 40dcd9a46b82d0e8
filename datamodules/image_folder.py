"""Folders of images on disk: the one list of image suffixes and the one reader every analysis uses.

    files = image_files("probe/")                        # sorted image files directly in the folder
    files = image_files("probe/", recursive=True)        # ... or anywhere below it
    files, labels, names = category_folder("localizer/") # one sub-folder of images per category
    img = read_image(files[0])                           # uint8 (H, W, 3) RGB
    source = ImageFolder(files)                          # a stimulus source: source.image(k), len(source)
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 (H, W, 3) RGB, a writable copy (torchvision warns on read-only arrays)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def image_files(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The image files (by suffix, any case) in ``folder`` (or below it), sorted by path.

    FileNotFoundError when the folder does not exist, ValueError when it holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found")
    found = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def category_folder(root: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[str]]:
    """A folder with one sub-folder of images per category -> (files, labels (n,) int64, category names).

    Categories are the sub-folder names in sorted order; images are the files with an image suffix.
    ValueError unless there are >= 2 categories with >= 2 images each.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    names = sorted(d.name for d in root.iterdir() if d.is_dir())
    files, labels = [], []
    for i, name in enumerate(names):
        imgs = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += imgs
        labels += [i] * len(imgs)
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(names)) if names else np.zeros(0)
    if len(names) < 2 or (counts < 2).any():
        raise ValueError(f"{root}: needs >= 2 category sub-folders with >= 2 images each "
                         f"(found {dict(zip(names, counts.tolist()))})")
    return files, np.asarray(labels, dtype=np.int64), names


class ImageFolder:
    """A stimulus source over image files: ``image(k)`` is file k, read as uint8 (H, W, 3) RGB."""

    def __init__(self, files: Sequence[str | os.PathLike]):
        self.files = [Path(f) for f in files]

    def __len__(self) -> int:
        return len(self.files)

    def image(self, k: int) -> np.ndarray:
        return read_image(self.files[int(k)])
