"""Folders (or zip archives) of images, one folder per class.

Two layouts are read:

* ``"class"`` (torchvision's ImageFolder): ``root/<class>/<image>``; the class is the image's folder.
* ``"group/class"`` (Omniglot): ``root/<alphabet>/<character>/<image>``; the class is
  ``"<alphabet>/<character>"`` and the alphabet is the example's group, so alphabets can be kept
  apart in a split.

Only the last one or two folder names of each image count, so an archive that wraps everything in a
top folder (``images_background.zip`` holds ``images_background/<alphabet>/...``) reads the same as
the unpacked folder.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from fwdgrad.data.dataset import Dataset
from fwdgrad.data.dataset import PathLike
from fwdgrad.data.dataset import encode_names
from fwdgrad.data.dataset import existing_path
from fwdgrad.data.dataset import make_dataset
from fwdgrad.data.dataset import natural_sort_key

LAYOUTS = ("class", "group/class")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff",
                    ".webp")
_MODES = {1: "L", 3: "RGB"}
_HINT = ("Pass path= a folder laid out as class/image (layout='class') or group/class/image "
         "(layout='group/class'), or a .zip archive of one.")


def _list_folder(root: str) -> List[Tuple[str, Tuple[str, ...]]]:
  entries = []
  for directory, _, files in os.walk(root):
    for name in files:
      full = os.path.join(directory, name)
      entries.append((full, tuple(os.path.relpath(full, root).split(os.sep))))
  return entries


def _list_zip(archive: zipfile.ZipFile) -> List[Tuple[str, Tuple[str, ...]]]:
  return [(name, tuple(name.split("/"))) for name in archive.namelist() if not name.endswith("/")]


def _to_array(data, mode: str, image_size: Optional[Tuple[int, int]], where: str) -> np.ndarray:
  try:
    image = Image.open(data)
  except (OSError, ValueError) as error:
    raise ValueError(f"Cannot read the image {where!r} ({error}); remove it or drop its suffix "
                     "from extensions=.") from error
  with image:
    try:
      image = image.convert(mode)
    except (OSError, ValueError) as error:  # A truncated file opens but does not decode.
      raise ValueError(f"Cannot decode the image {where!r} ({error}); the file is truncated or "
                       "corrupt: remove or replace it.") from None
    if image_size is not None and image.size != (image_size[1], image_size[0]):
      # PIL's bilinear filter widens its support when shrinking, so this also anti-aliases.
      image = image.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
    array = np.asarray(image, np.float32) / 255.0
  if array.ndim == 2:
    array = array[..., None]
  return array


def load_image_folder(
    path: Union[PathLike, Sequence[PathLike]],
    *,
    layout: str = "class",
    image_size: Optional[Union[int, Tuple[int, int]]] = None,
    channels: int = 1,
    invert: bool = False,
    max_per_class: Optional[int] = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> Dataset:
  """Reads every image under one or more folders or zip archives.

  Classes and groups are numbered in natural order of their names, and the images of a class in
  natural order of their file names, so the result does not depend on the file system. An image
  found under the same class and file name in several sources (the Omniglot "small" sets share
  two alphabets) is read once.

  Args:
    path: a folder, a ``.zip`` file, or a sequence of them whose classes are merged.
    layout: ``"class"`` or ``"group/class"`` (see the module docstring).
    image_size: ``(height, width)`` or one int for a square to resize every image to (bilinear);
      ``None`` keeps the stored size, which must then be the same for all images.
    channels: 1 (grayscale) or 3 (RGB).
    invert: return ``1 - x``; Omniglot draws black strokes on white, and inverting makes the
      strokes the nonzero pixels.
    max_per_class: keep only the first images of each class (for quick experiments).
    extensions: file suffixes read as images (case-insensitive); other files are ignored.

  Returns:
    A :class:`Dataset` with ``inputs`` float32 ``(n, height, width, channels)`` in ``[0, 1]``;
    for ``layout="group/class"`` also ``groups``.

  Raises:
    ValueError: for a missing path, an unknown layout, no images, or mixed sizes without
      ``image_size``.

  Examples:
    >>> omniglot = load_image_folder("images_background_small1.zip", layout="group/class",
    ...                              image_size=28)  # doctest: +SKIP
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
  if channels not in _MODES:
    raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
  if isinstance(image_size, int):
    image_size = (image_size, image_size)
  paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
  if not paths:
    raise ValueError(f"path is an empty sequence. {_HINT}")
  extensions = tuple(e.lower() for e in extensions)
  depth = 2 if layout == "class" else 3

  # (class name, file name) -> (source index, member); the first source wins.
  found: Dict[Tuple[str, str], Tuple[int, str]] = {}
  archives: Dict[int, zipfile.ZipFile] = {}
  try:
    for i, source in enumerate(paths):
      source = existing_path(source, "Image folder", _HINT)
      if os.path.isfile(source):
        if not zipfile.is_zipfile(source):
          raise ValueError(f"{source!r} is a file but not a zip archive. {_HINT}")
        try:
          archives[i] = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, OSError) as error:
          raise ValueError(f"{source!r} is not a readable zip archive ({error}). {_HINT}") from None
        entries = _list_zip(archives[i])
      else:
        entries = _list_folder(source)
      for member, parts in entries:
        if len(parts) < depth or not parts[-1].lower().endswith(extensions):
          continue
        class_name = "/".join(parts[-depth:-1])
        found.setdefault((class_name, parts[-1]), (i, member))
    if not found:
      raise ValueError(f"No images ({', '.join(extensions)}) at depth {depth} under {paths}. "
                       f"{_HINT}")

    keys = sorted(found, key=lambda k: (natural_sort_key(k[0]), natural_sort_key(k[1])))
    if max_per_class is not None:
      kept, count = [], {}
      for key in keys:
        count[key[0]] = count.get(key[0], 0) + 1
        if count[key[0]] <= max_per_class:
          kept.append(key)
      keys = kept

    images = []
    for key in keys:
      i, member = found[key]
      if i in archives:
        try:
          data = io.BytesIO(archives[i].read(member))
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
          raise ValueError(f"{paths[i]!r}: the zip member {member!r} is corrupt ({error}); "
                           "download or re-create the archive.") from None
      else:
        data = member
      images.append(_to_array(data, _MODES[channels], image_size, member))
  finally:
    for archive in archives.values():
      archive.close()

  shapes = sorted({image.shape for image in images})
  if len(shapes) > 1:
    raise ValueError(f"Images have different sizes {shapes[:4]}; pass image_size=(height, width) "
                     "to resize them to one size.")
  inputs = np.stack(images)
  if invert:
    inputs = 1.0 - inputs
  labels, class_names = encode_names([k[0] for k in keys])
  groups, group_names = None, ()
  if layout == "group/class":
    groups, group_names = encode_names([k[0].split("/")[0] for k in keys])
  return make_dataset(inputs, labels, class_names, groups, group_names)
