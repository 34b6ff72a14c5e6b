"""``sdxl-bench run``: every prompt x seed x variant through base + refiner, into a resumable run folder.

A run folder ``<run_dir>/<run_id>/`` holds

* ``config.json``: the resolved configuration (written atomically before any image);
* ``images/<variant>/<prompt_index>-<seed>.png``: each image, written atomically;
* ``results.jsonl``: one complete JSON line per image, appended as it finishes (``status`` ``ok`` or
  ``error`` with its ``message``; a failed image does not stop the run);
* ``report.html``: rendered from the two files above by :mod:`sdxl_core.report`.

Running again with the same ``run_id`` (and the same configuration) skips every image that has an ``ok``
line and its file, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fcntl
import json
import os
import platform
import re
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from sdxl_core.atomicio import append_json_line, write_json_atomic, write_png_atomic
from sdxl_core.errors import InvalidConfigError, SdxlBenchError
from sdxl_core.generate import GenerationRequest, GenerationSettings, PromptEncoder, check_prompts, generate
from sdxl_core.loading import default_device, load_pipelines, resolve_dtype
from sdxl_core.presets import EMBEDDED, TINY, TINY_DEFAULT_SIZE, TINY_DEFAULT_STEPS, default_size, default_steps
from sdxl_core.run_args import DEFAULT_RUN_DIR
from sdxl_core.prompts_default import DEFAULT_PROMPTS, read_prompts_file
from sdxl_core.report import CONFIG_FILE, RESULTS_FILE, latest_results, load_config, render_report
from sdxl_core.variants import (DEFAULT_WITH_LORA, DEFAULT_WITHOUT_LORA, Variant, check_variant_names, get_variant,
                                parse_variant_list)

SCHEMA_VERSION = 1
WARMUP_STEPS = 4
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_MESSAGE = 2000
_RESUME_IGNORES = ("warmup",)  # config keys that do not change an image and may differ on resume


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs. ``variants=None`` means the default list (see :func:`resolve_variants`);
    ``run_id=None`` means a new id from the current time; ``run_dir`` is the folder that holds run folders."""

    base: str = TINY
    refiner: str | None = TINY
    vae: str | None = None
    lora: str | None = None  # NAME@VERSION=PATH, NAME=PATH or PATH (see sdxl_core.lora_files)
    allow_pickle: bool = False  # let --lora read .bin/.ckpt/.pt/.pth (torch.load with weights_only=True)
    variants: tuple[str, ...] | None = None
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seeds: tuple[int, ...] = (0, 1)
    settings: GenerationSettings = field(
        default_factory=lambda: GenerationSettings(steps=TINY_DEFAULT_STEPS, width=TINY_DEFAULT_SIZE,
                                                   height=TINY_DEFAULT_SIZE))
    device: str | None = None
    dtype: str | None = None
    run_dir: str = DEFAULT_RUN_DIR
    run_id: str | None = None
    weights_variant: str | None = None  # e.g. "fp16" for the hub SDXL repos (not a run variant)
    warmup: bool = True  # a short untimed generation per variant first, so set-up is not an image's time


@dataclass(frozen=True)
class ResolvedRun:
    config: RunConfig
    run_id: str
    folder: Path
    variants: tuple[Variant, ...]
    variants_note: str | None
    device: str
    dtype: str
    lora: Any  # sdxl_core.lora_files.LoraSpec or None
    lora_record: dict[str, Any] | None  # name, version, file, sha256, size and metadata, before loading


# ------------------------------------------------------------------------------------------------
# Validation (nothing here loads a model)
# ------------------------------------------------------------------------------------------------


def check_run_id(run_id: Any) -> str:
    """A run id names one folder under the run root: letters, digits, ``.``, ``_``, ``-``; no path tricks."""
    if not isinstance(run_id, str) or not run_id:
        raise InvalidConfigError(f"run id must be a non-empty string, got {run_id!r}")
    if "\0" in run_id or "/" in run_id or "\\" in run_id or ".." in run_id or os.path.isabs(run_id) \
            or not _RUN_ID.match(run_id):
        raise InvalidConfigError(
            f"run id {run_id!r} is not a plain folder name; use 1-128 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit, without '..' (e.g. --run-id wolf-test-1)")
    return run_id


def new_run_id() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def check_seeds(seeds: Any) -> tuple[int, ...]:
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise InvalidConfigError(f"seeds must be a non-empty list of integers, got {seeds!r}; pass e.g. --seeds 0,1")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63:
            raise InvalidConfigError(f"seed {s!r} is not a non-negative integer; pass e.g. --seeds 0,1")
    duplicates = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if duplicates:
        raise InvalidConfigError(f"seed(s) {', '.join(map(str, duplicates))} listed more than once")
    return tuple(seeds)


def resolve_variants(names: Sequence[str] | None, has_lora: bool) -> tuple[tuple[Variant, ...], str | None]:
    """The variants to render and a note saying what was left out by default.

    Not named: all three with a LoRA, ``baseline`` and ``wrong_negative`` without one (the note says so).
    Named: exactly those; ``wrong_lora`` without a LoRA is refused, naming ``--lora``.
    """
    if names is None:
        if has_lora:
            return tuple(get_variant(n) for n in DEFAULT_WITH_LORA), None
        note = ("no --lora given, so the default variants are baseline and wrong_negative; "
                "wrong_lora needs --lora PATH (a LoRA .safetensors for the base)")
        return tuple(get_variant(n) for n in DEFAULT_WITHOUT_LORA), note
    if isinstance(names, str):
        names = parse_variant_list(names)
    variants = tuple(get_variant(n) for n in check_variant_names(tuple(names)))
    needing = [v.name for v in variants if v.needs_lora]
    if needing and not has_lora:
        raise InvalidConfigError(
            f"variant {', '.join(needing)} applies a LoRA to the base, but no LoRA was given; pass "
            f"--lora PATH (a LoRA .safetensors, e.g. the 'wrong' LoRA) or drop it from --variants")
    return variants, None


def check_lora(lora: str | None, allow_pickle: bool = False) -> tuple[Any, dict[str, Any] | None]:
    """Parse ``--lora`` and find its file (nothing is loaded): the spec, and the record a run keeps of it
    (name, version, path, sha256, size, safetensors metadata), so results can be tracked across versions."""
    if lora is None:
        return None, None
    from sdxl_core import lora_files

    if not isinstance(lora, str) or not lora.strip():
        raise InvalidConfigError("--lora is empty; give NAME@VERSION=PATH, or the path of a LoRA .safetensors file")
    try:
        spec = lora_files.parse_lora_spec(lora, allow_pickle=allow_pickle)
        path = lora_files.resolve_lora_file(spec)
    except SdxlBenchError as exc:
        raise type(exc)(f"--lora {lora!r}: {exc}") from None
    record = lora_files.lora_record(spec, path)
    if record.file_format == "pickle" and not allow_pickle:
        raise lora_files.LoraFileError(f"LoRA file {path} is a pickle file, which can run code when loaded; "
                                       f"convert it to .safetensors, or pass --allow-pickle if you trust it")
    doc = record.as_dict()
    doc["training"] = _training_sidecar(Path(path), record.sha256)
    return spec, doc


def _training_sidecar(weights: Path, sha256: str) -> dict[str, Any] | None:
    """What ``sdxl-bench train-lora`` wrote beside these weights (version label, steps, dataset hash, final
    loss), when its sidecar is there and describes this very file (same sha256)."""
    from sdxl_core.train_lora import METADATA_NAME

    sidecar = weights.parent / METADATA_NAME
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("sha256") != sha256:
        return None
    losses = meta.get("loss_curve") or []
    keep = ("version_label", "base_model", "instance_prompt", "rank", "steps", "learning_rate", "dataset")
    return {**{k: meta.get(k) for k in keep}, "final_loss": losses[-1] if losses else None}


def _check_models(config: RunConfig) -> None:
    """Model references are checked (folder has model_index.json; hub id cached when offline) without loading."""
    from sdxl_core import loading, presets

    if config.base == presets.SDXL_RANDOM:
        if config.refiner not in (None, presets.SDXL_RANDOM) or config.vae is not None:
            raise InvalidConfigError("sdxl-random builds its own refiner and VAE; drop --refiner/--vae or use folders")
        return
    if config.refiner in presets.EMBEDDED and config.base != config.refiner:
        raise InvalidConfigError(f"--refiner {config.refiner} only pairs with --base {config.refiner}")
    if config.base == presets.TOY:
        presets.toy_folders()
    elif config.base != presets.TINY:
        loading.resolve_source(config.base, "base", ())
    if config.refiner not in (None, *presets.EMBEDDED):
        loading.resolve_source(config.refiner, "refiner", ())
    if config.vae is not None:
        if not isinstance(config.vae, str) or not config.vae.strip():
            raise InvalidConfigError("--vae is empty; give a hub id or a folder, or leave it out")
        if not Path(config.vae).expanduser().is_dir():
            loading.resolve_source_hub_only(config.vae, "vae")


def resolve_run(config: RunConfig) -> ResolvedRun:
    """Check every part of ``config`` and resolve the defaults; raises before any model is touched."""
    import torch

    if not isinstance(config.base, str) or not config.base.strip():
        raise InvalidConfigError("--base is empty; give tiny, a hub id or a diffusers folder")
    if config.refiner is not None and (not isinstance(config.refiner, str) or not config.refiner.strip()):
        raise InvalidConfigError("--refiner is empty; give tiny, a hub id or a diffusers folder, or leave it out")
    _check_models(config)
    if not isinstance(config.settings, GenerationSettings):
        raise InvalidConfigError(f"settings must be a GenerationSettings, got {type(config.settings).__name__}")
    config.settings.check()
    if isinstance(config.prompts, str):
        raise InvalidConfigError("prompts must be a list of strings, not one string")
    check_prompts(list(config.prompts))
    seeds = check_seeds(config.seeds)
    lora, lora_record = check_lora(config.lora, config.allow_pickle)
    variants, note = resolve_variants(config.variants, lora is not None)
    run_id = check_run_id(config.run_id) if config.run_id is not None else new_run_id()
    if not isinstance(config.run_dir, (str, os.PathLike)) or not str(config.run_dir).strip() \
            or "\0" in str(config.run_dir):
        raise InvalidConfigError(f"--run-dir {config.run_dir!r} is not a usable folder path")
    root = Path(config.run_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise InvalidConfigError(f"--run-dir {str(root)!r} is a file; give a folder")
    try:
        device = torch.device(config.device or default_device())
    except (RuntimeError, TypeError) as exc:
        raise InvalidConfigError(
            f"--device {config.device!r} is not a device ({exc}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidConfigError(
            f"--device {config.device} asks for CUDA, but no CUDA device is available; use --device cpu")
    dtype = str(resolve_dtype(config.dtype, device)).replace("torch.", "")
    resolved_config = replace(config, prompts=tuple(config.prompts), seeds=seeds, run_id=run_id,
                              variants=tuple(v.name for v in variants))
    return ResolvedRun(resolved_config, run_id, root / run_id, variants, note, str(device), dtype, lora, lora_record)


def config_document(run: ResolvedRun) -> dict[str, Any]:
    """What ``config.json`` holds; only its ``config`` part must match when a run is resumed."""
    c = run.config
    return {
        "schema": SCHEMA_VERSION,
        "run_id": run.run_id,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "base": c.base,
            "refiner": c.refiner,
            "vae": c.vae,
            "weights_variant": c.weights_variant,
            "lora": run.lora_record,
            "variants": [asdict(v) for v in run.variants],
            "variants_note": run.variants_note,
            "prompts": list(c.prompts),
            "seeds": list(c.seeds),
            "settings": asdict(c.settings),
            "device": run.device,
            "dtype": run.dtype,
            "warmup": c.warmup,
        },
        "environment": _environment(),
    }


def _environment() -> dict[str, str]:
    from sdxl_core.provenance import library_versions

    found = library_versions(("torch", "diffusers", "transformers", "compel", "peft"))
    # a missing package is shown as absent; the run fails later where it is needed
    return {"python": platform.python_version(), **{k: v for k, v in found.items() if v is not None}}


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkItem:
    variant: Variant
    prompt_index: int
    prompt: str
    seed: int

    @property
    def file(self) -> str:
        return f"images/{self.variant.name}/{self.prompt_index}-{self.seed}.png"

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.variant.name, self.prompt_index, self.seed)


def work_items(run: ResolvedRun) -> list[WorkItem]:
    """Prompt-major order, so an interrupted run has whole comparison rows."""
    return [WorkItem(v, i, p, s) for i, p in enumerate(run.config.prompts) for s in run.config.seeds
            for v in run.variants]


def pending_items(run: ResolvedRun) -> list[WorkItem]:
    """Items without an ``ok`` result line whose image file exists."""
    latest = latest_results(run.folder)
    pending = []
    for item in work_items(run):
        row = latest.get(item.key)
        done = (row is not None and row.get("status") == "ok" and row.get("prompt") == item.prompt
                and isinstance(row.get("file"), str) and (run.folder / row["file"]).is_file())
        if not done:
            pending.append(item)
    return pending


class _RunLock:
    """An exclusive lock on the run folder, so two processes never write the same run."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "_RunLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise InvalidConfigError(
                f"run folder {self.path.parent} is in use by another sdxl-bench process; wait for it or "
                f"use another --run-id") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _check_resume(folder: Path, document: dict[str, Any]) -> None:
    """A second run with the same id must ask for the same thing, or its images would be mixed up."""
    path = folder / CONFIG_FILE
    if not path.exists():
        return
    old = load_config(folder)["config"]
    new = document["config"]
    differs = sorted(k for k in set(old) | set(new) if k not in _RESUME_IGNORES and old.get(k) != new.get(k))
    if differs:
        raise InvalidConfigError(
            f"run {folder.name} already exists in {folder.parent} with a different configuration "
            f"({', '.join(differs)} differ); resume it with the same settings or pick a new --run-id")


def _log(message: str) -> None:
    print(f"sdxl-bench run: {message}", file=sys.stderr, flush=True)


def run_job(config: RunConfig, progress: bool = True) -> Path:
    """Render every pending image of ``config`` into its run folder and return the path of report.html."""
    run = resolve_run(config)  # everything is checked before a folder is made or a model loaded
    run.folder.mkdir(parents=True, exist_ok=True)
    with _RunLock(run.folder):
        document = config_document(run)
        _check_resume(run.folder, document)
        if not (run.folder / CONFIG_FILE).exists():
            write_json_atomic(run.folder / CONFIG_FILE, document)
        if run.variants_note:
            _log(run.variants_note)
        pending = pending_items(run)
        total = len(work_items(run))
        if len(pending) < total:
            _log(f"resuming run {run.run_id}: {total - len(pending)} of {total} images already done")
        try:
            if pending:
                _render(run, pending, progress)
        finally:
            report = render_report(run.folder)
    return report


def _render(run: ResolvedRun, pending: list[WorkItem], progress: bool) -> None:
    from tqdm.auto import tqdm

    c = run.config
    pipes = load_pipelines(c.base, c.refiner, vae=c.vae, device=run.device, dtype=run.dtype,
                           variant=c.weights_variant)
    if run.lora is not None:
        from sdxl_core.lora_files import load_loras

        # Checked in full (keys, shapes against this base, dtypes, NaN/inf) before anything is loaded; on the base
        # only, never the refiner. Each image then sets the LoRA's scale (0 for the variants without it).
        load_loras(pipes, [run.lora])
    encoder = PromptEncoder(pipes) if c.settings.use_compel else None
    if c.warmup:
        first_of_each: dict[str, WorkItem] = {}
        for item in pending:
            first_of_each.setdefault(item.variant.name, item)
        for item in first_of_each.values():
            _warm_up(pipes, encoder, run, item)
    results = run.folder / RESULTS_FILE
    with tqdm(total=len(pending), desc=f"run {run.run_id}", unit="img", disable=not progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for item in pending:
            bar.set_postfix_str(f"{item.variant.name} #{item.prompt_index} seed {item.seed}")
            append_json_line(results, _render_one(pipes, encoder, run, item))
            bar.update(1)


def _request(run: ResolvedRun, item: WorkItem, settings: GenerationSettings | None = None) -> GenerationRequest:
    return GenerationRequest(prompt=item.prompt, seed=item.seed, negative_prompt=item.variant.negative_prompt,
                             lora_scale=item.variant.lora_scale, settings=settings or run.config.settings)


def _warm_up(pipes: Any, encoder: Any, run: ResolvedRun, item: WorkItem) -> None:
    """One short generation at the run's size, untimed and unsaved, per variant (negative prompt and LoRA
    scale take different code paths): first-call set-up is not counted in any image's time."""
    settings = replace(run.config.settings, steps=min(run.config.settings.steps, WARMUP_STEPS))
    try:
        generate(pipes, _request(run, item, settings), encoder)
    except Exception as exc:  # the real images will record the error
        _log(f"warm-up failed ({type(exc).__name__}: {exc}); continuing")


def _render_one(pipes: Any, encoder: Any, run: ResolvedRun, item: WorkItem) -> dict[str, Any]:
    row: dict[str, Any] = {
        "variant": item.variant.name,
        "prompt_index": item.prompt_index,
        "prompt": item.prompt,
        "seed": item.seed,
        "negative_prompt": item.variant.negative_prompt,
        "lora_scale": item.variant.lora_scale,
        "lora": ({"label": f"{run.lora_record['name']}@{run.lora_record['version']}",
                  "sha256": run.lora_record["sha256"]} if item.variant.needs_lora and run.lora_record else None),
        "file": None,
        "seconds": None,
        "stage_seconds": {},
        "status": "error",
        "message": None,
    }
    t0 = time.perf_counter()
    try:
        output = generate(pipes, _request(run, item), encoder)
        seconds = time.perf_counter() - t0
        write_png_atomic(run.folder / item.file, output.images[0])
        row.update(file=item.file, seconds=round(seconds, 4),
                   stage_seconds={k: round(v, 4) for k, v in output.stage_seconds.items()}, status="ok",
                   sanity=list(_sanity_flags(output)))
    except Exception as exc:  # one failing image is recorded and the run goes on
        message = f"{type(exc).__name__}: {exc}"
        row.update(seconds=round(time.perf_counter() - t0, 4), message=message[:_MAX_MESSAGE])
    row["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return row


def _sanity_flags(output: Any) -> tuple[str, ...]:
    """NaN/inf in pixels or latents, black or constant images (the fp16 VAE failure mode): recorded per row."""
    from sdxl_core.metrics.sanity import image_sanity

    return image_sanity(output.images[0], output.latents).flags


def summarize(run_dir: str | Path) -> dict[str, int]:
    """Counts of ok, error and not-yet-run images of a run folder, from its JSON files."""
    data = load_config(run_dir)["config"]
    latest = latest_results(run_dir)
    counts = {"ok": 0, "error": 0, "missing": 0}
    for v in data.get("variants", []):
        for i in range(len(data.get("prompts", []))):
            for s in data.get("seeds", []):
                row = latest.get((v["name"], i, s))
                counts["missing" if row is None else "ok" if row.get("status") == "ok" else "error"] += 1
    return counts


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InvalidConfigError(f"--seeds {text!r} must be comma-separated integers, e.g. 0,1") from None
    return check_seeds(seeds)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """A RunConfig from ``sdxl-bench run`` arguments; tiny gets tiny defaults (128 px, 20 steps)."""
    base = args.base or TINY
    refiner = args.refiner
    if refiner is None:
        refiner = base if base in EMBEDDED else None
    elif refiner.lower() == "none":
        refiner = None
    prompts = read_prompts_file(args.prompts_file) if args.prompts_file else DEFAULT_PROMPTS
    if args.num_prompts is not None:
        if args.num_prompts < 1 or args.num_prompts > len(prompts):
            raise InvalidConfigError(
                f"--num-prompts {args.num_prompts} is out of range; there are {len(prompts)} prompts")
        prompts = prompts[: args.num_prompts]
    size = args.size if args.size is not None else default_size(base)
    steps = args.steps if args.steps is not None else default_steps(base)
    settings = GenerationSettings(steps=steps, guidance_scale=args.guidance_scale, high_noise_frac=args.high_noise_frac,
                                  width=size, height=size, use_compel=not args.no_compel)
    return RunConfig(
        base=base, refiner=refiner, vae=args.vae, lora=args.lora, allow_pickle=args.allow_pickle,
        variants=parse_variant_list(args.variants) if args.variants is not None else None,
        prompts=tuple(prompts), seeds=parse_seeds(args.seeds), settings=settings,
        device=args.device, dtype=args.dtype, run_dir=args.run_dir, run_id=args.run_id,
        weights_variant=args.variant, warmup=not args.no_warmup)


def main_run(args: argparse.Namespace) -> int:
    """Run, print a summary to stderr and the report path as the last line of stdout; 1 if any image failed."""
    report = run_job(config_from_args(args))
    counts = summarize(report.parent)
    _log(f"{counts['ok']} images ok, {counts['error']} failed, {counts['missing']} not run; report:")
    print(report, flush=True)
    return 1 if counts["error"] or counts["missing"] else 0
