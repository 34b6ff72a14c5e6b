"""The three ways each prompt is rendered in the "wrong" negative-prompt LoRA experiment.

* ``baseline``: no negative prompt, LoRA scale 0 (the plain SDXL base + refiner ensemble).
* ``wrong_negative``: the negative prompt ``"wrong"``, LoRA scale 0: what the word alone does.
* ``wrong_lora``: the negative prompt ``"wrong"`` with the LoRA trained on "wrong" images at scale 1 on the
  base, so the negative direction points at what the LoRA learned. It needs a LoRA (``--lora``).
"""

from __future__ import annotations

from dataclasses import dataclass

from sdxl_core.errors import InvalidConfigError


@dataclass(frozen=True)
class Variant:
    """How one image of a prompt differs from the others: negative prompt and LoRA scale on the base."""

    name: str
    negative_prompt: str | None
    lora_scale: float
    description: str

    @property
    def needs_lora(self) -> bool:
        return self.lora_scale != 0


BASELINE = Variant("baseline", None, 0.0, "no negative prompt, no LoRA")
WRONG_NEGATIVE = Variant("wrong_negative", "wrong", 0.0, 'negative prompt "wrong", no LoRA')
WRONG_LORA = Variant("wrong_lora", "wrong", 1.0, 'negative prompt "wrong" with the LoRA at scale 1 on the base')

VARIANTS: dict[str, Variant] = {v.name: v for v in (BASELINE, WRONG_NEGATIVE, WRONG_LORA)}
# What a run renders when no variants are named: all three with a LoRA, the first two without.
DEFAULT_WITH_LORA = (BASELINE.name, WRONG_NEGATIVE.name, WRONG_LORA.name)
DEFAULT_WITHOUT_LORA = (BASELINE.name, WRONG_NEGATIVE.name)


def get_variant(name: str) -> Variant:
    """The built-in variant called ``name``; an unknown name raises :class:`InvalidConfigError` listing them."""
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise InvalidConfigError(
            f"unknown variant {name!r}; valid variants are {', '.join(VARIANTS)}"
        ) from None


def parse_variant_list(text: str) -> tuple[str, ...]:
    """``"baseline,wrong_negative"`` -> ``("baseline", "wrong_negative")``, each checked, duplicates refused."""
    names = tuple(part.strip() for part in text.split(","))
    if not names or any(not n for n in names):
        raise InvalidConfigError(
            f"--variants {text!r} has an empty entry; give comma-separated names from {', '.join(VARIANTS)}"
        )
    return check_variant_names(names)


def check_variant_names(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    names = tuple(names)
    if not names:
        raise InvalidConfigError(f"the variant list is empty; give at least one of {', '.join(VARIANTS)}")
    for name in names:
        get_variant(name)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidConfigError(f"variant(s) {', '.join(duplicates)} listed more than once")
    return names
