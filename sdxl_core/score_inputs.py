"""What ``sdxl-bench score`` scores: image sets, each image with its prompt and pairing key.

A *run folder* (``config.json`` + ``results.jsonl`` written by ``sdxl-bench run``) gives one set per variant,
its images paired across variants by ``(prompt_index, seed)``. Any other folder is one set named after the
folder; its prompts come from a ``metadata.jsonl`` beside the images (``file`` and ``prompt`` per line, as
``make-wrong-dataset`` writes) or from ``--prompts FILE`` (one line per image, in file-name order).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdxl_core.errors import InvalidConfigError
from sdxl_core.imagefiles import IMAGE_SUFFIXES, image_files



@dataclass(frozen=True)
class ScoredImage:
    path: Path
    prompt: str | None
    key: tuple[Any, ...]  # pairs the same (prompt, seed) across variants


@dataclass(frozen=True)
class ImageSet:
    name: str
    images: tuple[ScoredImage, ...]

    @property
    def prompts(self) -> list[str | None]:
        return [im.prompt for im in self.images]


def is_run_folder(folder: Path) -> bool:
    from sdxl_core.report import CONFIG_FILE, RESULTS_FILE

    return (folder / CONFIG_FILE).is_file() and (folder / RESULTS_FILE).is_file()


def run_folder_sets(folder: Path) -> list[ImageSet]:
    """One set per variant from a run folder's newest ``ok`` row of each image (error rows are not scored)."""
    from sdxl_core.report import latest_results

    by_variant: dict[str, list[ScoredImage]] = {}
    for row in latest_results(folder).values():
        if row.get("status") != "ok" or not row.get("file"):
            continue
        by_variant.setdefault(row["variant"], []).append(
            ScoredImage(folder / row["file"], row.get("prompt"), (row["prompt_index"], row["seed"])))
    if not by_variant:
        raise InvalidConfigError(f"run folder {str(folder)!r} has no finished images to score")
    order = ["baseline"] + sorted(v for v in by_variant if v != "baseline")
    return [ImageSet(v, tuple(sorted(by_variant[v], key=lambda im: im.key))) for v in order if v in by_variant]


def folder_set(folder: Path, prompts_file: str | None = None) -> ImageSet:
    files = image_files(folder)
    if not files:
        raise InvalidConfigError(f"{str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    prompts: list[str | None] = [None] * len(files)
    meta = folder / "metadata.jsonl"
    if prompts_file is not None:
        from sdxl_core.prompts_default import read_prompts_file

        lines = read_prompts_file(prompts_file)
        if len(lines) != len(files):
            raise InvalidConfigError(f"--prompts {prompts_file!r} has {len(lines)} prompts for {len(files)} images in "
                                     f"{str(folder)!r}; give one prompt per image, in file-name order")
        prompts = list(lines)
    elif meta.is_file():
        by_file = {}
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                by_file[row["file"]] = row["prompt"]
            except (ValueError, KeyError, TypeError):
                raise InvalidConfigError(f"{meta}: line {n} is not a JSON object with file and prompt") from None
        prompts = [by_file.get(f.name) for f in files]
    return ImageSet(folder.name, tuple(ScoredImage(f, p, (f.name,)) for f, p in zip(files, prompts)))


def collect_sets(fake: str, prompts_file: str | None = None) -> list[ImageSet]:
    folder = Path(fake).expanduser()
    if not folder.is_dir():
        raise InvalidConfigError(f"--fake {fake!r} is not a folder; give a run folder or a folder of images")
    if is_run_folder(folder):
        if prompts_file is not None:
            raise InvalidConfigError("--prompts is for plain image folders; a run folder records its own prompts")
        return run_folder_sets(folder)
    return [folder_set(folder, prompts_file)]


def load_images(image_set: ImageSet) -> list[Any]:
    """The set's images as RGB PIL images; an unreadable file is an error that names it."""
    from PIL import Image

    out = []
    for im in image_set.images:
        try:
            with Image.open(im.path) as img:
                out.append(img.convert("RGB"))
        except Exception as exc:
            raise InvalidConfigError(f"image {str(im.path)!r} cannot be read: {exc}") from exc
    return out
