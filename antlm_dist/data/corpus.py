"""Find and validate the text files of a corpus.

Accepted corpora (``data.corpus``):

* ``"bundled"``: the public-domain demo corpus shipped in ``antlm_dist/data/demo_corpus``;
* a folder in the BabyLM layout: ``train/*.train`` + ``dev/*.dev`` (the bundled and
  shared layout), or the BabyLM 2024 release layout ``babylm_10M/*.train`` (or
  ``babylm_100M``, ``train_10M``, ``train_100M``) + ``babylm_dev/*.dev`` (or ``dev``),
  or ``*.train`` / ``*.dev`` files directly in the folder;
* a list of text files (all used for training; no dev split unless a file ends in ``.dev``).
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

TRAIN_DIRS = ("train", "babylm_10M", "babylm_100M", "train_10M", "train_100M", "babylm_strict_small", "babylm_strict")
DEV_DIRS = ("dev", "babylm_dev")


class CorpusError(ValueError):
    """The corpus is missing, empty or not UTF-8 text."""


@dataclass(frozen=True)
class CorpusFiles:
    """Text files of one corpus, sorted by name. ``dev`` may be empty."""

    train: tuple[Path, ...]
    dev: tuple[Path, ...]
    root: str


def bundled_corpus_dir() -> Path:
    """Folder of the shipped demo corpus (see its ``SOURCES.md`` for provenance)."""
    return Path(str(resources.files("antlm_dist.data") / "demo_corpus"))


def _glob(folder: Path, suffix: str) -> list[Path]:
    return sorted(p for p in folder.glob(f"*{suffix}") if p.is_file())


def find_corpus(corpus, validate: bool = True) -> CorpusFiles:
    """Resolve ``data.corpus`` to its train and dev files, and validate them.

    ``validate=False`` skips reading every file (non-empty, UTF-8): for ranks started by a
    launcher that has already checked them in its preflight.

    Raises:
        CorpusError: the path does not exist, holds no ``.train`` files, a file is empty,
            or a file is not valid UTF-8 (naming the file and byte offset).
    """
    if corpus == "bundled":
        corpus = str(bundled_corpus_dir())
    if isinstance(corpus, (list, tuple)):
        if not corpus:
            raise CorpusError("data.corpus is an empty list; give text files or a corpus folder")
        files = [Path(p) for p in corpus]
        for p in files:
            if not p.is_file():
                raise CorpusError(f"data.corpus: {p} is not a file")
        train = sorted(p for p in files if not p.name.endswith(".dev"))
        dev = sorted(p for p in files if p.name.endswith(".dev"))
        root = ",".join(str(p) for p in files)
    else:
        folder = Path(str(corpus)).expanduser()
        if not folder.exists():
            raise CorpusError(
                f"data.corpus={str(corpus)!r} does not exist; give a folder in the BabyLM layout "
                "(train/*.train, dev/*.dev), a list of text files, or 'bundled'"
            )
        if folder.is_file():
            return find_corpus([str(folder)], validate)
        train, dev = [], []
        for name in TRAIN_DIRS:
            if (folder / name).is_dir():
                train += _glob(folder / name, ".train")
        for name in DEV_DIRS:
            if (folder / name).is_dir():
                dev += _glob(folder / name, ".dev")
        train += _glob(folder, ".train")
        dev += _glob(folder, ".dev")
        if not train:
            raise CorpusError(
                f"data.corpus={str(folder)!r} holds no *.train files; expected the BabyLM layout "
                f"({'/, '.join(TRAIN_DIRS)}/ with *.train and dev/ or babylm_dev/ with *.dev)"
            )
        root = str(folder)
    for p in list(train) + list(dev) if validate else ():
        check_text_file(p)
    return CorpusFiles(tuple(train), tuple(dev), root)


def check_text_file(path: Path) -> None:
    """Refuse empty and non-UTF-8 files before any tokenisation starts.

    Raises:
        CorpusError: naming the file, and for bad bytes the offset and a fix.
    """
    data = path.read_bytes()
    if not data.strip():
        raise CorpusError(f"corpus file {path} is empty; remove it or add text")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"corpus file {path} is not UTF-8 (bad byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            f"convert it, e.g. iconv -f latin1 -t utf-8 {path}"
        ) from exc
