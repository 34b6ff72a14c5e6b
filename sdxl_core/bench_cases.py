"""The cases of a benchmark session: variant x LoRA version x prompt x seed, from a :class:`BenchConfig`.

``baseline`` and ``wrong_negative`` run without a LoRA; ``wrong_lora`` runs once per ``--sdxl-lora`` entry
(each LoRA version, scale 1 on the base, negative prompt ``wrong``); a declared variant runs its own LoRAs with
their weights, its negative prompt and guidance. :class:`CaseRunner` switches adapters for every case
explicitly, so no case sees the LoRA state of the one before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sdxl_core.bench_config import BenchConfig
from sdxl_core.errors import InvalidConfigError


@dataclass(frozen=True)
class BenchCase:
    """One image to make: the unit of work of the latency and quality suites."""

    variant: str
    lora: str | None  # "NAME@VERSION" or "a@v1+b@v2" for declared merges; None without LoRA
    prompt_index: int
    prompt: str
    seed: int
    negative_prompt: str | None
    loras: tuple[tuple[str, float], ...] = ()  # (NAME@VERSION, weight) active in this case
    guidance_scale: float | None = None  # None: the session's

    @property
    def id(self) -> str:
        """A readable, unique pytest id."""
        return f"{self.variant}" + (f"[{self.lora}]" if self.lora else "") + f"-p{self.prompt_index}-s{self.seed}"


def read_prompts(path: str | None, base: str | None = None) -> tuple[str, ...]:
    """Prompts from a ``.txt`` (one a line), ``.jsonl`` (strings or objects with ``prompt``) or ``.yaml``
    (a list, or a mapping with ``prompts``) file; None gives the built-in set (captions of held-out toy-world
    scenes for the ``toy`` base, which the oracle can judge)."""
    from sdxl_core.prompts_default import DEFAULT_PROMPTS, read_prompts_file

    if path is None:
        if base == "toy":
            from sdxl_core.toy.world import bench_prompts

            return bench_prompts()
        return DEFAULT_PROMPTS
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix in ("", ".txt"):
        return read_prompts_file(p)
    if suffix not in (".jsonl", ".yaml", ".yml"):
        raise InvalidConfigError(f"--sdxl-prompts {path!r}: unknown format {suffix!r}; use .txt, .jsonl or .yaml")
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidConfigError(f"--sdxl-prompts {path!r} does not exist") from None
    except UnicodeDecodeError as exc:
        raise InvalidConfigError(f"--sdxl-prompts {path!r} is not UTF-8 text ({exc})") from None
    if suffix == ".jsonl":
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise InvalidConfigError(f"--sdxl-prompts {path!r}: line {n} is not JSON") from None
            items.append(item.get("prompt") if isinstance(item, dict) else item)
    else:
        import yaml

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidConfigError(f"--sdxl-prompts {path!r}: not valid YAML ({exc})") from None
        items = doc.get("prompts") if isinstance(doc, dict) else doc
        if not isinstance(items, list):
            raise InvalidConfigError(f"--sdxl-prompts {path!r}: give a list of prompts (or prompts: [...])")
    prompts = tuple(items)
    bad = [i for i, x in enumerate(prompts) if not isinstance(x, str) or not x.strip()]
    if bad or not prompts:
        raise InvalidConfigError(f"--sdxl-prompts {path!r}: entry {bad[0] if bad else 0} is not a non-empty "
                                 f"prompt string" if bad else f"--sdxl-prompts {path!r} holds no prompts")
    return prompts


def lora_labels(config: BenchConfig) -> list[str]:
    from sdxl_core.lora_files import parse_lora_spec

    return [parse_lora_spec(spec).label for spec in config.lora]


def default_variants(config: BenchConfig) -> tuple[str, ...]:
    names = ["baseline", "wrong_negative"] + (["wrong_lora"] if config.lora else [])
    return tuple(names + [v.name for v in config.declared_variants])


def expand_cases(config: BenchConfig) -> list[BenchCase]:
    """Every case of the session, variant-major then LoRA version, prompt and seed (a stable order)."""
    from sdxl_core.variants import VARIANTS

    prompts = read_prompts(config.prompts, config.base)
    declared = {v.name: v for v in config.declared_variants}
    labels = lora_labels(config)
    cases = []
    for name in config.variants or default_variants(config):
        if name in declared:
            v = declared[name]
            combos = [("+".join(label for label, _ in v.loras) or None, v.loras, v.negative_prompt, v.guidance_scale)]
        else:
            builtin = VARIANTS[name]
            if builtin.needs_lora and not labels:
                raise InvalidConfigError("variant wrong_lora needs a LoRA: pass --sdxl-lora NAME@VERSION=PATH")
            combos = ([(label, ((label, builtin.lora_scale),), builtin.negative_prompt, None) for label in labels]
                      if builtin.needs_lora else [(None, (), builtin.negative_prompt, None)])
        for lora, loras, negative, guidance in combos:
            for i, prompt in enumerate(prompts):
                for seed in config.seeds:
                    cases.append(BenchCase(name, lora, i, prompt, seed, negative, tuple(loras), guidance))
    return cases


def generation_settings(config: BenchConfig) -> Any:
    from sdxl_core.generate import GenerationSettings

    from sdxl_core.presets import default_guidance, default_size, default_steps

    size = config.size or default_size(config.base)
    # 0 is a valid guidance scale, so only None means "the preset's".
    guidance = config.guidance_scale if config.guidance_scale is not None else default_guidance(config.base)
    settings = GenerationSettings(steps=config.steps or default_steps(config.base), guidance_scale=guidance,
                                  high_noise_frac=config.high_noise_frac, width=size, height=size)
    settings.check()
    return settings


def _xdist_worker_device() -> str | None:
    """Under ``pytest -n N`` each worker takes its own GPU (worker gwK -> cuda:K modulo the GPU count)."""
    import os

    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return f"cuda:{int(worker[2:]) % torch.cuda.device_count()}"


class CaseRunner:
    """Loaded pipelines with every LoRA version as its own adapter; :meth:`request` sets a case's adapters."""

    def __init__(self, config: BenchConfig, device: str | None = None, dtype: str | None = None) -> None:
        from sdxl_core.generate import PromptEncoder
        from sdxl_core.loading import load_pipelines
        from sdxl_core.lora_files import load_loras, parse_lora_spec

        self.config = config
        self.settings = generation_settings(config)
        refiner = config.refiner if config.refiner is not None else (config.base if config.offline_default else None)
        device = device or _xdist_worker_device()
        self.pipes = load_pipelines(config.base, None if refiner == "none" else refiner, vae=config.vae,
                                    device=device, dtype=dtype)
        specs = [parse_lora_spec(s) for s in config.lora]
        self.records = load_loras(self.pipes, specs) if specs else []
        self.adapters = {spec.label: spec.adapter_name for spec in specs}
        self.encoder = PromptEncoder(self.pipes)

    def request(self, case: BenchCase) -> Any:
        """Switch exactly this case's adapters on (all off for a case without LoRA) and return its request."""
        from sdxl_core.generate import GenerationRequest

        if self.adapters:
            names = [self.adapters[label] for label, _ in case.loras]
            if names:
                self.pipes.base.enable_lora()
                self.pipes.base.set_adapters(names, [w for _, w in case.loras])
            else:
                self.pipes.base.disable_lora()
        settings = self.settings if case.guidance_scale is None else replace(self.settings,
                                                                               guidance_scale=case.guidance_scale)
        return GenerationRequest(case.prompt, case.seed, case.negative_prompt, 1.0 if case.loras else 0.0, settings)

    def generate(self, case: BenchCase) -> Any:
        from sdxl_core.generate import generate

        return generate(self.pipes, self.request(case), self.encoder)
