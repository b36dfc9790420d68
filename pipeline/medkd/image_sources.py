"""Where a user's images and labels come from: an ImageFolder tree or a CSV/TSV of path,label[,split].

Collecting only lists and checks (files, classes, columns); `medkd.importing` reads the pixels.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from medkd.errors import MedkdError
from medkd.image_files import IMAGE_SUFFIXES, is_image_file

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
PATH_COLUMNS = ("path", "file", "filename", "image")
LAYOUT = "SOURCE/<class>/<image>, optionally under SOURCE/train|val|test/"
Label = str | frozenset[str]  # one class name, or the set of a multi-label image's labels


@dataclass(frozen=True)
class Item:
    path: Path
    label: Label  # a CSV's single `label` column stays raw text until the task is known
    split: str | None  # given by a folder or the split column; None to be drawn


@dataclass(frozen=True)
class Source:
    items: list[Item]  # sorted by path
    kind: str  # "folder" or "csv"
    label_names: list[str] | None  # a CSV's 0/1 columns, in their order; None to derive from the labels


def collect_source(source: Path) -> Source:
    """The images SOURCE names, each with its label and given split, sorted by path; one line if SOURCE is
    not a folder of class folders or a CSV/TSV of path,label."""
    if source.is_dir():
        return _collect_folder(source)
    if source.is_file() and _is_table(source):
        return _collect_csv(source)
    if not source.exists():
        raise MedkdError(f"{source} does not exist; give a folder ({LAYOUT}) or a CSV/TSV of path,label")
    raise MedkdError(f"{source} is neither a folder ({LAYOUT}) nor a CSV/TSV with a header of path,label")


def _visible_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    # Hidden files and folders (.DS_Store, macOS's ._x.png, .ipynb_checkpoints) are never images.
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and is_image_file(p)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _collect_folder(source: Path) -> Source:
    folders = _visible_folders(source)
    split_folders = [f for f in folders if f.name.lower() in SPLIT_NAMES]
    if split_folders:
        others = [f.name for f in folders if f not in split_folders]
        if others:
            raise MedkdError(
                f"{source} mixes split folders ({', '.join(f.name for f in split_folders)}) with other "
                f"folders ({', '.join(others)}); put every class folder inside train/, val/ or test/"
            )
        seen: dict[str, str] = {}
        for f in split_folders:
            name = SPLIT_NAMES[f.name.lower()]
            if name in seen:
                raise MedkdError(
                    f"{source} has both {seen[name]}/ and {f.name}/ for {name}; keep one of them"
                )
            seen[name] = f.name
        groups = [(SPLIT_NAMES[f.name.lower()], f) for f in split_folders]
    else:
        groups = [(None, source)]
    items = []
    for split, folder in groups:
        class_folders = _visible_folders(folder)
        if not class_folders:
            loose = len(_image_files(folder))
            raise MedkdError(
                f"{folder} holds no class folders ({loose} image(s) directly inside); the layout is {LAYOUT}"
            )
        for class_folder in class_folders:
            files = _image_files(class_folder)
            if not files:
                raise MedkdError(
                    f"class folder {class_folder} holds no images ({'/'.join(IMAGE_SUFFIXES)}); add some or "
                    f"remove the folder"
                )
            items += [Item(p, class_folder.name, split) for p in files]
    return Source(sorted(items, key=lambda item: str(item.path)), "folder", None)


def _is_table(path: Path) -> bool:
    if path.suffix.lower() in (".csv", ".tsv"):
        return True
    try:
        with open(path, encoding="utf-8-sig") as f:
            csv.Sniffer().sniff(f.readline(), delimiters=",\t;")
    except (UnicodeDecodeError, csv.Error):
        return False
    return True


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    text = path.read_text(encoding="utf-8-sig")  # -sig: Excel writes a byte-order mark
    delimiter = {".csv": ",", ".tsv": "\t"}.get(path.suffix.lower())
    if delimiter is None:
        delimiter = csv.Sniffer().sniff(text.splitlines()[0] if text else ",", delimiters=",\t;").delimiter
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    header = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = header
    rows = [
        (reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}) for row in reader
    ]
    return header, rows


def _collect_csv(source: Path) -> Source:
    header, rows = _read_table(source)
    found = ", ".join(header) or "none"
    path_column = next((c for c in header if c.lower() in PATH_COLUMNS), None)
    if path_column is None:
        raise MedkdError(f"{source} has no path column ({', '.join(PATH_COLUMNS)}); found columns: {found}")
    split_column = next((c for c in header if c.lower() == "split"), None)
    label_column = next((c for c in header if c.lower() == "label"), None)
    flag_columns = [] if label_column else [c for c in header if c not in (path_column, split_column)]
    if label_column is None and not flag_columns:
        raise MedkdError(
            f"{source} has no label column ('label', or one 0/1 column per label); found columns: {found}"
        )
    items, lines = [], {}
    for line, row in rows:
        where = f"{source}, line {line}"
        path = _row_path(source, where, row[path_column])
        if path in lines:
            raise MedkdError(
                f"{source}, lines {lines[path]} and {line} both name {row[path_column]}; list each image "
                f"once (a|b gives it several labels)"
            )
        lines[path] = line
        label = row[label_column] if label_column else _flags(where, row, flag_columns)
        items.append(Item(path, label, _row_split(where, row[split_column]) if split_column else None))
    if not items:
        raise MedkdError(f"{source} lists no images (a header and no rows)")
    return Source(sorted(items, key=lambda item: str(item.path)), "csv", flag_columns or None)


def _row_path(source: Path, where: str, value: str) -> Path:
    if not value:
        raise MedkdError(f"{where}: the path is empty; give each row an image file")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else source.parent / path
    if not path.is_file():
        raise MedkdError(
            f"{where}: image {value} not found (paths are relative to the CSV's folder {source.parent})"
        )
    return path.resolve()


def _flags(where: str, row: dict[str, str], columns: list[str]) -> frozenset[str]:
    for column in columns:
        if row.get(column, "") not in ("0", "1"):
            raise MedkdError(
                f"{where}: column '{column}' holds '{row.get(column, '')}'; without a 'label' column every "
                f"other column is a 0/1 label (drop '{column}', or name the single-label column 'label')"
            )
    return frozenset(c for c in columns if row[c] == "1")


def _row_split(where: str, value: str) -> str:
    if value.lower() not in SPLIT_NAMES:
        raise MedkdError(
            f"{where}: split '{value}' is not train, val or test (valid and validation mean val)"
        )
    return SPLIT_NAMES[value.lower()]
