"""Recognise a dataset folder as people have it, and import it into the canonical layout.

:func:`detect_layout` looks at a source (``prepare.source``) and returns a :class:`Layout`:
the format, per split the annotation file, image folder and (YOLO) label folder, and a
one-line explanation (:meth:`Layout.describe`). :func:`import_layout` hands it to the
importer of its format (:mod:`detr.data.formats`, :mod:`detr.data.voc`,
:mod:`detr.data.yolo`). Layouts recognised, with ``format="auto"`` (an explicit format looks
only for its own):

- coco, canonical: ``annotations/{train,val}.json`` + ``images/{train,val}/``;
- coco, the COCO release: ``annotations/instances_{train,val}2017.json`` + ``train2017/``,
  ``val2017/`` (or ``images/train2017/``, ...; any year);
- coco_panoptic, the COCO panoptic release: ``annotations/panoptic_{train,val}2017.json`` +
  their PNG folders ``annotations/panoptic_{train,val}2017/`` + ``train2017/``, ``val2017/``
  (or ``images/train2017/``, ...; any year); imported by
  :func:`detr.data.panoptic.import_coco_panoptic`, one annotation per segment. A COCO folder
  holding both the instances and the panoptic release is two layouts: ``prepare.format``
  (``coco`` or ``coco_panoptic``) picks one;
- coco, labelling tools' export (Roboflow): ``train/``, ``valid/``, ``test/``, each with
  ``_annotations.coco.json`` beside its images;
- coco, one json file as the source, its images in ``image_dir``;
- yolo, Ultralytics: ``data.yaml``/``dataset.yaml`` (or a yaml file as the source) naming the
  split image folders; labels where Ultralytics looks (``images`` -> ``labels`` in the path);
- yolo, plain: ``images/`` + ``labels/`` (split sub-folders optional), class names in
  ``data.yaml`` or ``classes.txt``;
- voc: ``Annotations/`` + ``JPEGImages/`` in the folder or one level down
  (``VOCdevkit/VOC2012``); split by ``ImageSets/Main/{train,val}.txt`` when both exist.

Split names: ``train``/``train2017`` -> train; ``val``/``valid``/``validation``/``val2017`` ->
val; a ``test`` split is left out with a note. A source with one split gets the key ``"all"``
(the importers split it by ``val_fraction``). Several layouts in one folder, or none, raise
:class:`FormatError` saying what was found or looked for and which params key to set.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from detr.data import panoptic, voc, yolo
from detr.data.formats import FormatError, ImportedDataset, Link, PathLike, import_coco

FORMATS = ("coco", "coco_panoptic", "voc", "yolo")
_SPLIT_NAME = re.compile(r"^(train|val|valid|validation|test)(\d{4})?$", re.IGNORECASE)
LOOKED_FOR = {
    "coco": ("annotations/{train,val}.json + images/{train,val}/ (the canonical layout)",
             "annotations/instances_{train,val}2017.json + train2017/, val2017/ (COCO release)",
             "train/, valid/, test/ each with _annotations.coco.json (Roboflow's COCO export)"),
    "coco_panoptic": ("annotations/panoptic_{train,val}2017.json + their PNG folders "
                      "annotations/panoptic_{train,val}2017/ + train2017/, val2017/ "
                      "(COCO panoptic release)",),
    "yolo": ("data.yaml or dataset.yaml naming train:/val: image folders (Ultralytics)",
             "images/ + labels/ with classes.txt (YOLO without a data.yaml)"),
    "voc": ("Annotations/ + JPEGImages/, here or one folder down (Pascal VOC)",),
}


def split_of(name: str) -> str | None:
    """``"train"``, ``"val"`` or ``"test"`` for a source's split name (``train2017``,
    ``valid``, ...); None for any other name."""
    match = _SPLIT_NAME.match(name)
    if match is None:
        return None
    word = match.group(1).lower()
    return {"valid": "val", "validation": "val"}.get(word, word)


@dataclass(frozen=True)
class SplitFiles:
    """One split of a source. ``annotations``: the COCO json (coco, coco_panoptic), the split
    list or the ``Annotations/`` folder (voc), None (yolo); ``labels``: the label folder
    (yolo), the PNG segment maps' folder (coco_panoptic)."""

    images: Path
    annotations: Path | None = None
    labels: Path | None = None


@dataclass(frozen=True)
class Layout:
    """A recognised source: ``splits`` has ``"train"`` and ``"val"``, or only ``"all"``;
    ``notes`` say what is left out; ``class_names`` are YOLO's (category ids 1..K)."""

    format: str
    name: str  # e.g. "the COCO release layout"
    root: Path
    splits: Mapping[str, SplitFiles]
    notes: tuple[str, ...] = ()
    class_names: tuple[str, ...] | None = None

    def describe(self) -> str:
        """One line: ``<name> in <root>: train: <files>, val: <files>``."""
        parts = []
        for split, files in self.splits.items():
            paths = (files.annotations, files.images, files.labels)
            label = "all (split by prepare.val_fraction)" if split == "all" else split
            parts.append(f"{label}: " + " + ".join(_short(self.root, p) for p in paths if p))
        return f"{self.name} in {self.root}: {', '.join(parts)}"


def detect_layout(source: PathLike, *, format: str = "auto",
                  image_dir: PathLike | None = None) -> Layout:
    """The one layout of ``source`` (module docstring); ``format``: auto, coco, voc or yolo.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        FormatError: no layout, several, or a layout half there (e.g. a json without its
            image folder); the message names the files and the params key to set.
    """
    if format not in ("auto", *FORMATS):
        raise ValueError(f"prepare.format: {format!r} is not one of auto, {', '.join(FORMATS)}")
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"prepare.source: {source} does not exist")
    wanted = FORMATS if format == "auto" else (format,)
    if source.is_file():
        layouts = [_from_file(source, image_dir)]
    else:
        layouts = [found for fmt, detect in _DETECTORS if fmt in wanted
                   for found in detect(source)]
        if image_dir is not None and layouts:
            note = "prepare.image_dir is only read with a single COCO json: ignored"
            layouts = [dataclasses.replace(x, notes=(*x.notes, note)) for x in layouts]
    layouts = [x for x in layouts if x.format in wanted]
    if len(layouts) == 1:
        return layouts[0]
    raise FormatError(_ambiguous(source, layouts) if layouts else _none_found(source, format))


def import_layout(layout: Layout, out_dir: PathLike, *, val_fraction: float = 0.2,
                  seed: int = 0, link: Link = "symlink") -> ImportedDataset:
    """Import ``layout`` into the canonical layout at ``out_dir`` with its format's importer."""
    common = {"val_fraction": val_fraction, "seed": seed, "link": link}
    if layout.format == "voc":
        return voc.import_voc(out_dir, layout.root, **common)
    if layout.format == "yolo":
        splits = {s: (f.images, f.labels) for s, f in layout.splits.items()}
        return yolo.import_yolo_splits(out_dir, splits, layout.class_names, **common)
    if layout.format == "coco_panoptic":
        splits = {s: (f.annotations, f.labels, f.images) for s, f in layout.splits.items()}
        return panoptic.import_coco_panoptic(out_dir, splits, **common)
    return import_coco(out_dir, {s: (f.annotations, f.images) for s, f in layout.splits.items()},
                       **common)


def _canonical(root: Path) -> list[Layout]:
    files = {s: root / "annotations" / f"{s}.json" for s in ("train", "val")}
    items = [(s, SplitFiles(_image_folder(root, f, [f"images/{s}"]), f))
             for s, f in files.items() if f.is_file()]
    return [_layout("coco", "the canonical layout", root, items)] if items else []


def _coco_release(root: Path) -> list[Layout]:
    items = []
    for file in sorted((root / "annotations").glob("instances_*.json")):
        name = file.stem.removeprefix("instances_")
        if split_of(name) is not None:
            folder = _image_folder(root, file, [name, f"images/{name}"])
            items.append((name, SplitFiles(folder, file)))
    if not items:
        return []
    used = {files.images for _, files in items}
    others = [d for d in (*_subfolders(root), *_subfolders(root / "images"))
              if split_of(d.name) is not None and d not in used]
    tests = [(d.name, SplitFiles(d)) for d in others if split_of(d.name) == "test"]
    notes = [f"{_short(root, d)} has no annotations/instances_{d.name}.json: not imported"
             for d in others if split_of(d.name) != "test"]
    return [_layout("coco", "the COCO release layout", root, items + tests, notes)]


def _coco_panoptic(root: Path) -> list[Layout]:
    items = []
    for file in sorted((root / "annotations").glob("panoptic_*.json")):
        name = file.stem.removeprefix("panoptic_")
        if split_of(name) is None:
            continue
        pngs = file.with_suffix("")
        if not pngs.is_dir():
            raise FormatError(f"{file}: found, but not its PNG folder {pngs}/ (unzip "
                              f"{file.stem}.zip there)")
        items.append((name, SplitFiles(_image_folder(root, file, [name, f"images/{name}"]),
                                       file, labels=pngs)))
    return [_layout("coco_panoptic", "the COCO panoptic release layout", root, items)
            ] if items else []


def _coco_export(root: Path) -> list[Layout]:
    items = []
    for folder in _subfolders(root):
        file = folder / "_annotations.coco.json"
        if file.is_file():
            if split_of(folder.name) is None:
                raise FormatError(f"{file}: the folder name {folder.name!r} is not a split "
                                  "(train, valid or val, test); rename it")
            items.append((folder.name, SplitFiles(folder, file)))
    return [_layout("coco", "a COCO export (Roboflow)", root, items)] if items else []


def _yolo_data_yaml(root: Path) -> list[Layout]:
    files = [root / n for n in ("data.yaml", "dataset.yaml") if (root / n).is_file()]
    found = [yolo.read_data_yaml(f) for f in files]
    return [_yolo_layout(root, data) for data in found if data.image_dirs]


def _yolo_layout(root: Path, data: yolo.DataYaml) -> Layout:
    items, notes = [], []
    for key, images in data.image_dirs.items():
        labels = yolo.labels_for(images)
        if key == "val" and images == data.image_dirs.get("train"):
            notes.append(f"{data.file.name}: val names the train folder, so it is one split")
            continue
        if not labels.is_dir() and key != "test":
            raise FormatError(f"{data.file}: '{key}' images in {images}, but no label folder "
                              f"{labels} (Ultralytics' rule: images -> labels in the path)")
        items.append((key, SplitFiles(images, labels=labels)))
    name = f"a YOLO dataset described by {data.file.name}"
    return _layout("yolo", name, root, items, notes, data.names)


def _yolo_plain(root: Path) -> list[Layout]:
    images, labels = root / "images", root / "labels"
    if not (images.is_dir() and labels.is_dir()) or _yolo_data_yaml(root):
        return []
    items = [(d.name, SplitFiles(d, labels=labels / d.name)) for d in _subfolders(images)
             if split_of(d.name) is not None]
    if not {split_of(n) for n, _ in items} >= {"train", "val"}:
        items = [("all", SplitFiles(images, labels=labels))]
    if not any((root / n).is_file() for n in ("classes.txt", "data.yaml", "dataset.yaml")):
        return []  # no class names: not a YOLO dataset one could import
    names = tuple(yolo.class_names_in(root))
    return [_layout("yolo", "a YOLO folder", root, items, (), names)]


def _voc(root: Path) -> list[Layout]:
    return [_voc_layout(d) for d in (root, *_subfolders(root))
            if (d / "Annotations").is_dir() and (d / "JPEGImages").is_dir()]


def _voc_layout(root: Path) -> Layout:
    lists = root / "ImageSets" / "Main"
    splits = {s: SplitFiles(root / "JPEGImages", lists / f"{s}.txt") for s in ("train", "val")}
    if not all(f.annotations.is_file() for f in splits.values()):
        splits = {"all": SplitFiles(root / "JPEGImages", root / "Annotations")}
    notes = ()
    if "all" not in splits and (lists / "test.txt").is_file():
        notes = (f"{lists / 'test.txt'}: the test split is not imported",)
    return Layout("voc", "a Pascal VOC folder", root, splits, notes)


def _layout(fmt: str, name: str, root: Path, items: Sequence[tuple[str, SplitFiles]],
            notes: Sequence[str] = (), class_names: Sequence[str] | None = None) -> Layout:
    """A Layout from ``(source split name, files)`` pairs: split names mapped, a test split
    left out with a note, a lone split keyed ``"all"``."""
    splits, notes = {}, list(notes)
    for source_name, files in items:
        split = "all" if source_name == "all" else split_of(source_name)
        if split == "test":
            notes.append(f"the test split ({_short(root, files.images)}) is not imported: "
                         "prepare writes train and val only")
        elif split in splits:
            first, second = (_short(root, f.annotations or f.images)
                             for f in (splits[split], files))
            raise FormatError(f"{root}: two {split} splits, {first} and {second}; keep one")
        else:
            splits[split] = files
    if not splits:
        raise FormatError(f"{root}: {name} with only a test split; prepare needs train data")
    if len(splits) == 1:
        splits = {"all": next(iter(splits.values()))}
    names = tuple(class_names) if class_names is not None else None
    return Layout(fmt, name, root, splits, tuple(notes), names)


def _image_folder(root: Path, annotations: Path, candidates: Sequence[str]) -> Path:
    for candidate in candidates:
        if (root / candidate).is_dir():
            return root / candidate
    wanted = " or ".join(f"{root / c}/" for c in candidates)
    raise FormatError(f"{annotations}: found, but not its image folder {wanted}; add it, or "
                      "import one json: prepare.source the json, prepare.image_dir its images")


def _from_file(source: Path, image_dir: PathLike | None) -> Layout:
    if source.suffix in (".yaml", ".yml"):
        return _yolo_layout(source.parent, yolo.read_data_yaml(source))
    if source.suffix != ".json":
        raise FormatError(f"prepare.source: {source} is a file but neither a COCO .json nor a "
                          "YOLO data .yaml; point it at the dataset folder")
    if image_dir is None:
        raise FormatError(f"prepare.image_dir: needed with a single COCO json ({source}): "
                          "set it to the folder its file_names are relative to")
    return _layout("coco", "a COCO json", source.parent,
                   [("all", SplitFiles(Path(image_dir), source))])


def _none_found(source: Path, format: str) -> str:
    wanted = FORMATS if format == "auto" else (format,)
    looked = [f"  - {text}" for fmt in wanted for text in LOOKED_FOR[fmt]]
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in source.iterdir())
    holds = ", ".join(entries[:12]) + (", ..." if len(entries) > 12 else "") or "nothing"
    which = "dataset layout" if format == "auto" else f"{format} layout (prepare.format: {format})"
    advice = ("Move the data into one of these layouts, or set prepare.format "
              f"({', '.join(FORMATS)}) and prepare.source to the folder that holds it"
              if format == "auto" else
              "Set prepare.format: auto to recognise any layout, or prepare.source to the "
              f"folder that holds the {format} data")
    return (f"{source}: no {which} recognised (it holds: {holds}). Looked for:\n"
            + "\n".join(looked) + f"\n{advice}; for one COCO json, set prepare.source to the "
            "json and prepare.image_dir to its images.")


def _ambiguous(source: Path, layouts: Sequence[Layout]) -> str:
    found = "\n".join(f"  - {x.format}: {x.describe()}" for x in layouts)
    if len({x.format for x in layouts}) > 1:
        formats = ", ".join(sorted({x.format for x in layouts}))
        advice = f"Set prepare.format ({formats}) to the one to import."
    else:
        advice = "Point prepare.source at the one to import."
    return f"{source}: found more than one dataset:\n{found}\n{advice}"


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _short(root: Path, path: Path) -> str:
    """``path`` relative to ``root`` where it lies below it; folders end with ``/``."""
    try:
        text = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        text = str(path)
    return f"{text}/" if path.is_dir() else text


_DETECTORS: tuple[tuple[str, Callable[[Path], list[Layout]]], ...] = (
    ("coco", _canonical), ("coco", _coco_release), ("coco_panoptic", _coco_panoptic),
    ("coco", _coco_export),
    ("yolo", _yolo_data_yaml), ("yolo", _yolo_plain), ("voc", _voc))
