"""The configuration of a benchmark run: ``--sdxl-*`` options over ``[tool.sdxl-bench]`` over defaults.

Every option has the same key in ``pyproject.toml`` (``--sdxl-guidance-scale`` is ``guidance-scale`` or
``guidance_scale``). Precedence: command line, then ``[tool.sdxl-bench]``, then :data:`DEFAULTS` (with the
``tiny`` preset's own size and step count when the base is ``tiny``). Variants beyond the three built-in ones
are declared as tables::

    [tool.sdxl-bench.variants.wrong_plus_subject]
    negative_prompt = "wrong"
    loras = { "wrong@v1" = 1.0, "subject@v2" = 0.8 }
    guidance_scale = 9.0

where the LoRA labels name ``--sdxl-lora NAME@VERSION=PATH`` entries. With such tables, the selection that
``variants = [...]`` would give goes into the same table as ``select = ["baseline", "wrong_plus_subject"]``
(TOML cannot hold a key and a table of one name). Nothing here imports torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from sdxl_core.errors import InvalidConfigError

PYPROJECT_TABLE = ("tool", "sdxl-bench")
FEATURE_NETWORKS = ("effnet-lite0", "inception")


@dataclass(frozen=True)
class DeclaredVariant:
    """A user variant: a negative prompt, LoRA adapters with weights (by ``NAME@VERSION``), a guidance scale."""

    name: str
    negative_prompt: str | None = None
    loras: tuple[tuple[str, float], ...] = ()
    guidance_scale: float | None = None


@dataclass(frozen=True)
class BenchConfig:
    """The resolved options of one benchmark session (saved with every run)."""

    base: str = "tiny"
    refiner: str | None = None
    vae: str | None = None
    lora: tuple[str, ...] = ()  # NAME@VERSION=PATH, repeatable: several LoRA versions in one run
    prompts: str | None = None  # txt, jsonl or yaml file; None: the built-in set
    seeds: tuple[int, ...] = (0, 1)
    steps: int | None = None
    guidance_scale: float | None = None  # None: the preset's (5 for toy), else 13 as in the reference
    high_noise_frac: float = 0.8
    size: int | None = None
    variants: tuple[str, ...] | None = None
    reference: str | None = None
    clip_model: str | None = None  # MODEL:PRETRAINED, MODEL:/path/weights or MODEL:smoke; see clip_spec()
    fid_features: str | None = None  # inception or effnet-lite0; see feature_network()
    run_dir: str = "reports"
    run_id: str | None = None  # reuse one to resume a run; default: a new id per session
    declared_variants: tuple[DeclaredVariant, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def offline_default(self) -> bool:
        """The embedded presets (``tiny``, ``toy``) run offline: they score with offline metrics."""
        return self.base in ("tiny", "toy")

    def clip_spec(self) -> tuple[str, str | None, bool]:
        """(open_clip model, pretrained tag or weights file, smoke). Default ``ViT-L-14:openai``; with the tiny
        base ``ViT-B-32:smoke`` (random CLIP, labelled smoke), since no CLIP weights ship offline."""
        from sdxl_core.presets import preset_defaults

        preset = preset_defaults(self.base)
        text = self.clip_model or (preset.clip_model if preset else "ViT-L-14:openai")
        model, _, pretrained = text.partition(":")
        if pretrained == "smoke":
            return model, None, True
        return model, pretrained or None, False

    def feature_network(self) -> str:
        """FID/KID features: ``inception`` by default, ``effnet-lite0`` (offline) with the tiny base."""
        from sdxl_core.presets import preset_defaults

        preset = preset_defaults(self.base)
        return self.fid_features or (preset.fid_features if preset else "inception")


OPTION_KEYS = tuple(f.name for f in fields(BenchConfig) if f.name != "declared_variants")
DEFAULTS = BenchConfig()


def option_name(key: str) -> str:
    return "--sdxl-" + key.replace("_", "-")


def read_pyproject(rootdir: str | Path) -> dict[str, Any]:
    """The ``[tool.sdxl-bench]`` table of ``rootdir/pyproject.toml`` (empty when there is none)."""
    import tomllib

    path = Path(rootdir) / "pyproject.toml"
    if not path.is_file():
        return {}
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidConfigError(f"{path}: not valid TOML ({exc}); fix the file or remove [tool.sdxl-bench]") from None
    table = doc
    for part in PYPROJECT_TABLE:
        table = table.get(part, {}) if isinstance(table, dict) else {}
    if not isinstance(table, dict):
        raise InvalidConfigError(f"{path}: [tool.sdxl-bench] must be a table")
    return table


def _normalise(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for raw, value in table.items():
        key = raw.replace("-", "_")
        if key == "variants" and isinstance(value, dict):
            # TOML cannot hold both `variants = [...]` and [variants.NAME]: the selection is then `select`
            value = dict(value)
            if "select" in value:
                out["variants"] = value.pop("select")
            key = "declared_variants"
        elif key not in OPTION_KEYS:
            raise InvalidConfigError(f"{where}: unknown key {raw!r}; valid keys are "
                                     f"{', '.join(k.replace('_', '-') for k in OPTION_KEYS)} and [variants.NAME]")
        out[key] = value
    return out


def _as_list(value: Any, key: str, where: str) -> list[Any]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise InvalidConfigError(f"{where}: {key} must be a list or a comma-separated string, got {value!r}")


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    seeds = []
    for item in _as_list(value, "seeds", where):
        try:
            seed = int(item) if not isinstance(item, (bool, float)) else None
        except (TypeError, ValueError):
            seed = None
        if seed is None or seed < 0 or (isinstance(item, str) and not item.strip().isdigit()):
            raise InvalidConfigError(f"{where}: seed {item!r} is not a whole number >= 0; give e.g. 0,1,2")
        seeds.append(seed)
    if not seeds:
        raise InvalidConfigError(f"{where}: seeds is empty; give e.g. 0,1")
    if len(set(seeds)) != len(seeds):
        raise InvalidConfigError(f"{where}: seeds {seeds} repeat a seed")
    return tuple(seeds)


def _number(value: Any, key: str, where: str, integer: bool = False) -> Any:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (integer and number != int(number)):
        kind = "a whole number" if integer else "a number"
        raise InvalidConfigError(f"{where}: {key} must be {kind}, got {value!r}")
    return int(number) if integer else number


def _declared(table: Any, where: str) -> tuple[DeclaredVariant, ...]:
    if not isinstance(table, dict):
        raise InvalidConfigError(f"{where}: variants must be tables [tool.sdxl-bench.variants.NAME]")
    out = []
    for name, spec in table.items():
        if not isinstance(spec, dict):
            raise InvalidConfigError(f"{where}: variant {name!r} must be a table (negative_prompt, loras, guidance_scale)")
        spec = {k.replace("-", "_"): v for k, v in spec.items()}
        unknown = set(spec) - {"negative_prompt", "loras", "guidance_scale"}
        if unknown:
            raise InvalidConfigError(f"{where}: variant {name!r} has unknown key(s) {sorted(unknown)}; "
                                     f"use negative_prompt, loras, guidance_scale")
        loras = spec.get("loras", {})
        if not isinstance(loras, dict):
            raise InvalidConfigError(f"{where}: variant {name!r}: loras must map NAME@VERSION to a weight")
        out.append(DeclaredVariant(
            name=name, negative_prompt=spec.get("negative_prompt"),
            loras=tuple((label, _number(w, f"variant {name} LoRA {label} weight", where)) for label, w in loras.items()),
            guidance_scale=(None if spec.get("guidance_scale") is None
                            else _number(spec["guidance_scale"], f"variant {name} guidance_scale", where))))
    return tuple(out)


def resolve(cli: Mapping[str, Any], pyproject: Mapping[str, Any], pyproject_path: str = "pyproject.toml",
            ) -> BenchConfig:
    """Command line (values that are not None) over ``[tool.sdxl-bench]`` over the defaults, checked."""
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for where, table in ((f"{pyproject_path} [tool.sdxl-bench]", _normalise(pyproject, pyproject_path)),
                         ("command line", {k: v for k, v in cli.items() if v is not None and v != () and v != []})):
        for key, value in table.items():
            merged[key], sources[key] = value, where
    values: dict[str, Any] = {}
    for key, value in merged.items():
        where = sources[key] if key == "declared_variants" else f"{sources[key]} ({option_name(key)})"
        if key == "seeds":
            values[key] = _seeds(value, where)
        elif key in ("lora", "variants"):
            values[key] = tuple(str(v) for v in _as_list(value, key, where))
        elif key == "declared_variants":
            values[key] = _declared(value, where)
        elif key in ("steps", "size"):
            values[key] = _number(value, key, where, integer=True)
        elif key in ("guidance_scale", "high_noise_frac"):
            values[key] = _number(value, key, where)
        elif value is not None and not isinstance(value, str):
            raise InvalidConfigError(f"{where}: {key} must be a string, got {value!r}")
        else:
            values[key] = value
    config = BenchConfig(**values)
    _check(config)
    return config


def _check(c: BenchConfig) -> None:
    if c.fid_features is not None and c.fid_features not in FEATURE_NETWORKS:
        raise InvalidConfigError(f"{option_name('fid_features')} {c.fid_features!r}: choose from "
                                 f"{', '.join(FEATURE_NETWORKS)}")
    if c.steps is not None and c.steps < 1:
        raise InvalidConfigError(f"{option_name('steps')} must be >= 1, got {c.steps}")
    if c.size is not None and (c.size < 8 or c.size % 8):
        raise InvalidConfigError(f"{option_name('size')} {c.size} must be a positive multiple of 8")
    if not 0 < c.high_noise_frac < 1:
        raise InvalidConfigError(f"{option_name('high_noise_frac')} must be between 0 and 1, got {c.high_noise_frac}")
    if c.guidance_scale is not None and not 0 <= c.guidance_scale <= 100:  # GenerationSettings' range
        raise InvalidConfigError(f"{option_name('guidance_scale')} {c.guidance_scale} is outside 0-100; SDXL is "
                                 f"usually run at 5-13 (values up to 1 turn classifier-free guidance off)")
    if c.run_id is not None:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", c.run_id):
            raise InvalidConfigError(f"{option_name('run_id')} {c.run_id!r}: use letters, digits, '.', '_' and '-' "
                                     f"(it names a folder under the run dir)")
    labels = {spec.split("=", 1)[0] for spec in c.lora}
    for v in c.declared_variants:
        missing = [label for label, _ in v.loras if label not in labels]
        if missing:
            raise InvalidConfigError(f"variant {v.name!r} uses LoRA {', '.join(missing)}, which no "
                                     f"{option_name('lora')} NAME@VERSION=PATH names (given: "
                                     f"{', '.join(sorted(labels)) or 'none'})")
    builtin = {"baseline", "wrong_negative", "wrong_lora"}
    clash = builtin & {v.name for v in c.declared_variants}
    if clash:
        raise InvalidConfigError(f"declared variant(s) {sorted(clash)} reuse a built-in name; rename them")
    if c.variants is not None:
        known = builtin | {v.name for v in c.declared_variants}
        unknown = [v for v in c.variants if v not in known]
        if unknown:
            raise InvalidConfigError(f"{option_name('variants')}: unknown variant(s) {', '.join(unknown)}; "
                                     f"choose from {', '.join(sorted(known))}")
