"""The dataset formats users already have, read into one list of (image, caption) records, and the
checks that refuse a hostile or broken dataset before any training time is spent.

Without torch (PIL only), so preflight runs it in the first seconds of a pod. Formats
(`--dataset_format`, auto-detected by default; README "Data formats"):

    csv    <root>/train/metadata.csv (or <root>/metadata.csv): columns file_name and text (or caption),
           file names relative to the metadata file's folder (the original framework's layout)
    jsonl  metadata.jsonl in the same places: one JSON object per line with file_name and text (or
           caption), as Hugging Face's imagefolder reads it
    txt    images in <root>/train (or <root>) with a same-name .txt caption beside each (kohya, ai-toolkit);
           --caption_extension names another ending (kohya's .caption)
    kohya  subfolders <repeats>_<name> of <root>, each holding images and .txt captions; an image
           without a .txt gets <name> as its caption (kohya's rule); repeats weight the folders

What is checked, and where (load_records):
  1. structure, for every record, cheap (no image is opened): the metadata's columns/keys, each row's
     file name (relative, inside the dataset folder after following symlinks), the image exists,
     the caption is text and not empty unless --default_caption is given, at least one record;
  2. every image, without decoding its pixels: Pillow reads the header (format, size); the size
     must be within --max_image_pixels (decompression bombs); Image.verify checks what the format
     allows cheaply (PNG: every chunk's CRC up to IEND, reading but not inflating the file); a JPEG
     must end with its end-of-image marker (a truncated download does not). Pixels are decoded only
     when a sample is drawn; a file that fails then (corrupt entropy data) also exits 65, named.
The first problem found ends the check with the file or row named (DatasetError, exit code 65).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import Callable, Iterable

from lorakube_api import contract

log = logging.getLogger(__name__)

TRAIN_SUBDIR = "train"
METADATA_FILE = "metadata.csv"              # the original framework's name
METADATA_JSONL = "metadata.jsonl"
FILE_COLUMN = "file_name"
CAPTION_COLUMNS = ("text", "caption")       # the first one present is the caption
REQUIRED_COLUMNS = (FILE_COLUMN, CAPTION_COLUMNS[0])
IMAGE_SUFFIXES = contract.IMAGE_SUFFIXES
CAPTION_SUFFIX = contract.DEFAULT_CAPTION_EXTENSION     # --caption_extension changes it
# kohya's folder name: the repeat count, an underscore, then the name (which doubles as the caption
# of images that have no .txt).
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
# Set by the CLI for the training processes of a pod whose preflight checked every image of this
# dataset path (preflight.dataset_checked_env); they then skip step 2 below.
ENV_DATASET_CHECKED = "LORAKUBE_DATASET_CHECKED"
CHECK_THREADS = 8                           # image headers are I/O bound: overlap the reads

FORMAT_AUTO, FORMAT_CSV, FORMAT_JSONL, FORMAT_TXT, FORMAT_KOHYA = contract.DATASET_FORMATS
_FLAGS = (f"{contract.FLAG_DEFAULT_CAPTION} (spec.dataset.defaultCaption)",
          f"{contract.FLAG_MAX_IMAGE_PIXELS} (spec.dataset.maxImagePixels)",
          f"{contract.FLAG_DATASET_FORMAT} (spec.dataset.format)",
          f"{contract.FLAG_CAPTION_EXTENSION} (spec.dataset.captionExtension)")
DEFAULT_CAPTION_HINT, MAX_PIXELS_HINT, FORMAT_HINT, EXTENSION_HINT = _FLAGS


class DatasetError(ValueError):
    """The dataset is malformed; the message names the file or row and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Record:
    path: Path                  # resolved, inside the dataset folder
    text: str
    repeats: int = 1            # kohya folders: how often per pass over the data
    origin: str = ""            # where it was declared, for messages ("metadata.csv row 3")


@dataclasses.dataclass(frozen=True)
class Found:
    """What auto-detection (or the explicit format) points at."""

    format: str
    source: Path                # the metadata file, or the folder holding the images / repeat folders


def _is_hidden(path: Path) -> bool:
    # Dot files include macOS's "._name.png" resource forks, which are not images.
    return path.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not _is_hidden(p) and not p.is_dir())


def _repeat_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and REPEAT_FOLDER.match(p.name))


def _expected(root: Path) -> str:
    return (f"expected one of: {root / TRAIN_SUBDIR / METADATA_FILE} (columns {','.join(REQUIRED_COLUMNS)}), "
            f"{METADATA_JSONL} in the same place, images with same-name {CAPTION_SUFFIX} captions, or folders "
            f"named <repeats>_<name> (kohya); see the README's Data formats")


def find_dataset(dataset_path: str | Path, dataset_format: str = FORMAT_AUTO) -> Found:
    """Which format `dataset_path` holds, cheaply (a few directory listings). DatasetError when
    nothing usable is there, or when two formats are and the choice would be a guess."""
    root = Path(dataset_path)
    if not root.is_dir():
        raise DatasetError(f"no folder {root}" if not root.exists() else f"{root} is a file, not a folder")
    folders = [root / TRAIN_SUBDIR, root]
    if dataset_format in (FORMAT_AUTO, FORMAT_CSV, FORMAT_JSONL):
        for folder in folders:
            metadata = {name: folder / name for name in (METADATA_FILE, METADATA_JSONL) if (folder / name).is_file()}
            if dataset_format == FORMAT_AUTO and len(metadata) == 2:
                raise DatasetError(f"{folder} holds both {METADATA_FILE} and {METADATA_JSONL}; remove one or set "
                                   f"{FORMAT_HINT} to csv or jsonl")
            wanted = {FORMAT_CSV: METADATA_FILE, FORMAT_JSONL: METADATA_JSONL}.get(dataset_format)
            for name, path in metadata.items():
                if wanted in (None, name):
                    return Found(FORMAT_CSV if name == METADATA_FILE else FORMAT_JSONL, path)
        if dataset_format != FORMAT_AUTO:
            name = METADATA_FILE if dataset_format == FORMAT_CSV else METADATA_JSONL
            raise DatasetError(f"no {name} in {root}: expected {folders[0] / name} (or {folders[1] / name})")
    if dataset_format in (FORMAT_AUTO, FORMAT_KOHYA):
        if _repeat_folders(root):
            return Found(FORMAT_KOHYA, root)
        if dataset_format == FORMAT_KOHYA:
            raise DatasetError(f"no folder named <repeats>_<name> (e.g. 10_cats) in {root}")
    for folder in folders:
        if folder.is_dir() and _images_in(folder):
            return Found(FORMAT_TXT, folder)
    if dataset_format == FORMAT_TXT:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folders[0]} or {root}")
    raise DatasetError(f"no dataset in {root}: {_expected(root)}")


def find_metadata(dataset_path: str | Path) -> Path:
    """The original layout's metadata.csv (DatasetError without one), for callers that need only it."""
    return find_dataset(dataset_path, FORMAT_CSV).source


# --- structure: records without opening an image -----------------------------------------------

def _inside(base: Path, relative: str, where: str, what: str = "file_name") -> Path:
    """`relative` under `base`, refusing absolute paths and anything (.., a symlink) that leads out."""
    if Path(relative).is_absolute():
        raise DatasetError(f"{where}: {what} {relative!r} is an absolute path; give it relative to {base.name}/")
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        raise DatasetError(f"{where}: {what} {relative!r} points outside the dataset folder ({path}); keep "
                           f"images inside {base.name}/ and do not link out of it")
    return path


def _caption(value: object, where: str, default: str | None) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        if default is None:
            raise DatasetError(f"{where}: empty caption; write one, or set {DEFAULT_CAPTION_HINT} "
                               f"(an empty default trains such images without a caption)")
        return default
    if not isinstance(value, str):
        raise DatasetError(f"{where}: the caption is {type(value).__name__} {value!r}, not text; write it as a string")
    return value.strip()


def _image(base: Path, name: str, where: str) -> Path:
    if not name:
        raise DatasetError(f"{where}: empty {FILE_COLUMN}")
    path = _inside(base, name, where)
    if not path.is_file():
        raise DatasetError(f"{where}: image {name!r} not found in {base}")
    return path


def _columns_error(where: str, found: Iterable[str]) -> DatasetError:
    found = [str(c) for c in found if c]
    missing = [c for c in (FILE_COLUMN,) if c not in found]
    if not any(c in found for c in CAPTION_COLUMNS):
        missing.append(" or ".join(CAPTION_COLUMNS))
    return DatasetError(f"{where}: missing column(s) {', '.join(missing)}; expected {FILE_COLUMN} and "
                        f"{' or '.join(CAPTION_COLUMNS)}, found {','.join(found) or 'no header'}")


def _read_csv(source: Path, base: Path, default: str | None) -> list[Record]:
    try:
        with source.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            text_column = next((c for c in CAPTION_COLUMNS if c in columns), None)
            if FILE_COLUMN not in columns or text_column is None:
                raise _columns_error(source.name, columns)
            rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{source}: not UTF-8 text ({exc}); save it as UTF-8 CSV") from exc
    except csv.Error as exc:
        raise DatasetError(f"{source}: not a valid CSV file ({exc})") from exc
    records = []
    for line, row in enumerate(rows, start=2):          # line 1 is the header
        where = f"{source.name} row {line}"
        path = _image(base, (row.get(FILE_COLUMN) or "").strip(), where)
        records.append(Record(path, _caption(row.get(text_column), where, default), origin=where))
    return records


def _read_jsonl(source: Path, base: Path, default: str | None) -> list[Record]:
    try:
        lines = source.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{source}: not UTF-8 text ({exc}); save it as UTF-8") from exc
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source.name} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); "
                               "one object per line") from exc
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: a JSON {type(row).__name__}, not an object like "
                               f'{{"{FILE_COLUMN}": "a.png", "text": "..."}}')
        text_key = next((k for k in CAPTION_COLUMNS if k in row), None)
        if FILE_COLUMN not in row or (text_key is None and default is None):
            raise _columns_error(where, row.keys())
        name = row[FILE_COLUMN]
        if not isinstance(name, str):
            raise DatasetError(f"{where}: {FILE_COLUMN} is {type(name).__name__} {name!r}, not a path")
        path = _image(base, name.strip(), where)
        records.append(Record(path, _caption(row.get(text_key) if text_key else None, where, default), origin=where))
    return records


def _caption_file(image: Path, base: Path, where: str, extension: str) -> str | None:
    """The text of the image's same-name caption file (a.png -> a.txt), or None without one."""
    caption = image.parent / (image.stem + extension)
    if not caption.exists():
        return None
    _inside(base, str(caption.relative_to(base)), where, what="caption file")
    try:
        # Line breaks read as spaces: a caption is one prompt.
        return " ".join(caption.read_text(encoding="utf-8-sig").split())
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{where}: caption file {caption.name} is not UTF-8 text ({exc}); save it as UTF-8") from exc
    except OSError as exc:
        raise DatasetError(f"{where}: caption file {caption.name} cannot be read ({exc.strerror})") from exc


def _read_folder(folder: Path, base: Path, default: str | None, repeats: int = 1,
                 extension: str = CAPTION_SUFFIX) -> list[Record]:
    records = []
    for image in _images_in(folder):
        relative = str(image.relative_to(base))
        where = relative
        path = _inside(base, relative, where, what="image")
        if not path.is_file():
            raise DatasetError(f"{where}: not a file (a link to nothing?); replace or remove it")
        text = _caption_file(image, base, where, extension)
        if text is None and default is None:
            other = (f"; or set {EXTENSION_HINT} if the captions end differently (kohya also writes .caption)"
                     if extension == CAPTION_SUFFIX else "")
            raise DatasetError(f"{where}: no caption file {image.stem}{extension} beside it (no {METADATA_FILE} "
                               f"or {METADATA_JSONL} found, so captions are read from {extension} files); write one, "
                               f"or set {DEFAULT_CAPTION_HINT} (an empty default trains such images without a "
                               f"caption){other}")
        text = _caption(text, f"{where} ({image.stem}{extension})", default)
        records.append(Record(path, text, repeats=repeats, origin=where))
    return records


def _read_kohya(root: Path, base: Path, default: str | None, extension: str = CAPTION_SUFFIX) -> list[Record]:
    loose = _images_in(root)
    if loose:
        raise DatasetError(f"{loose[0].name}: an image beside the <repeats>_<name> folders of {root}; move it "
                           f"into a folder such as 1_{loose[0].stem}")
    for other in sorted(p for p in root.iterdir() if p.is_dir() and not REPEAT_FOLDER.match(p.name)):
        if not _is_hidden(other) and _images_in(other):
            raise DatasetError(f"{other.name}/: images in a folder without a repeat count; rename it to "
                               f"1_{other.name} (or 10_{other.name} to show it ten times as often)")
    records = []
    for folder in _repeat_folders(root):
        count, name = REPEAT_FOLDER.match(folder.name).groups()  # type: ignore[union-attr]
        if int(count) < 1:
            raise DatasetError(f"{folder.name}/: the repeat count must be at least 1")
        if not _images_in(folder):
            raise DatasetError(f"{folder.name}/: no images ({', '.join(IMAGE_SUFFIXES)})")
        # kohya's rule: an image without a .txt is captioned with the folder's name.
        records += _read_folder(folder, base, name.strip() if default is None else default, int(count), extension)
    return records


def read_records(dataset_path: str | Path, dataset_format: str = FORMAT_AUTO, default_caption: str | None = None,
                 caption_extension: str = CAPTION_SUFFIX) -> tuple[Found, list[Record]]:
    """Step 1: every record, checked without opening an image. `caption_extension`: the ending of
    the caption files of the txt and kohya formats (metadata files carry their captions)."""
    found = find_dataset(dataset_path, dataset_format)
    root = Path(dataset_path).resolve()
    source = found.source.resolve()
    if not source.is_relative_to(root):
        raise DatasetError(f"{found.source.name} links outside the dataset folder ({source}); copy it in instead")
    base = source.parent if found.format in (FORMAT_CSV, FORMAT_JSONL) else source
    if found.format in (FORMAT_CSV, FORMAT_JSONL):
        reader: Callable[[Path, Path, str | None], list[Record]] = (
            _read_csv if found.format == FORMAT_CSV else _read_jsonl)
        records = reader(source, base, default_caption)
    elif found.format == FORMAT_KOHYA:
        records = _read_kohya(source, base, default_caption, caption_extension)
    else:
        records = _read_folder(source, base, default_caption, extension=caption_extension)
    if not records:
        what = {FORMAT_CSV: "add one line per image as file_name,text",
                FORMAT_JSONL: 'add one line per image as {"file_name": ..., "text": ...}'}.get(found.format,
                                                                                              "add images")
        raise DatasetError(f"{found.source}: no rows; {what}")
    return found, records


# --- images: header, size, cheap integrity --------------------------------------------------------

def _jpeg_is_complete(img, fh) -> bool:
    """A JPEG's entropy-coded data ends with the EOI marker (FF D9); a download cut short has none.
    Fast path: the file ends with it. Otherwise (cameras append data after EOI) look for it after
    the scan's start, where FF D9 can only be that marker (data bytes FF are stuffed as FF 00)."""
    fh.seek(-2, 2)
    if fh.read(2) == b"\xff\xd9":
        return True
    start = img.tile[0][2] if img.tile else 0
    fh.seek(start)
    previous = b""
    while chunk := fh.read(1 << 20):
        if b"\xff\xd9" in previous[-1:] + chunk:
            return True
        previous = chunk
    return False


def check_image(record: Record, max_pixels: int) -> None:
    from PIL import Image, UnidentifiedImageError

    where, name = record.origin or record.path.name, record.path.name
    try:
        with record.path.open("rb") as fh, Image.open(fh) as img:
            # Image.open reads only the header: the size is known before a pixel is decoded.
            width, height = img.size
            if width * height > max_pixels:
                raise DatasetError(f"{where}: {name} is {width}x{height} = {width * height} pixels, more than the "
                                   f"limit of {max_pixels} (a decompression bomb, or far above any training size); "
                                   f"downscale it or raise {MAX_PIXELS_HINT}")
            kind = img.format
            if kind == "JPEG" and not _jpeg_is_complete(img, fh):
                raise DatasetError(f"{where}: {name} is a truncated JPEG (no end-of-image marker); replace it")
            img.verify()
    except DatasetError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DatasetError(f"{where}: {name} is not a readable image ({exc}); replace or remove it") from exc


def allow_pixels(max_pixels: int) -> None:
    """Pillow's own bomb guard warns above Image.MAX_IMAGE_PIXELS and refuses above twice that.
    Every image this process trains on was checked against `max_pixels`, so the guard is raised to
    it where it is lower (a limit the user raised is not undone when a sample is decoded); it is
    never lowered, which would only turn our refusals into Pillow's warnings elsewhere."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def check_images(records: list[Record], max_pixels: int, threads: int = CHECK_THREADS) -> None:
    """Step 2: every distinct image, reads overlapped; the first bad one in dataset order is named.
    Pillow's guard is off meanwhile: check_image compares every header with `max_pixels` itself,
    before anything is decoded, and names the file (Pillow would warn, or raise without the size)."""
    from PIL import Image

    unique = list({r.path: r for r in reversed(records)}.values())[::-1]
    guard, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="dataset-check")
    try:
        # Drained in order: the first image that fails raises here, naming its file.
        list(pool.map(lambda r: check_image(r, max_pixels), unique))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        Image.MAX_IMAGE_PIXELS = guard


def load_records(dataset_path: str | Path, max_pixels: int = contract.DEFAULT_MAX_IMAGE_PIXELS, *,
                 dataset_format: str = FORMAT_AUTO, default_caption: str | None = None,
                 caption_extension: str = CAPTION_SUFFIX, verify_images: bool = True) -> list[Record]:
    """The dataset's records, in a fixed order, after the checks in this module's docstring.
    `verify_images=False` skips step 2 (this pod's preflight already did it)."""
    started = time.monotonic()
    found, records = read_records(dataset_path, dataset_format, default_caption, caption_extension)
    if verify_images:
        check_images(records, max_pixels)
    allow_pixels(max_pixels)
    log.info("dataset %s: %s format, %d images%s checked in %.1f s", dataset_path, found.format,
             len({r.path for r in records}), "" if verify_images else " (headers checked by preflight)",
             time.monotonic() - started)
    return records
