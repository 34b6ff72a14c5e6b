"""A small, varied prompt set in the spirit of the "wrong" negative-prompt LoRA experiment.

It mixes subjects where SDXL's failures show (eyes, hands, text, food, crowds at night) with plain scenes,
and some prompts use compel weighting (``(oil on canvas)+++``), as the reference notebooks do.
The first prompts are the most varied, so a run with ``--num-prompts 4`` still covers different kinds.
"""

from __future__ import annotations

from pathlib import Path

from sdxl_core.errors import InvalidConfigError

DEFAULT_PROMPTS: tuple[str, ...] = (
    "a wolf in a misty pine forest at dawn, (oil on canvas)+++, highly detailed",
    "an extreme close-up of a human eye, macro photography, every eyelash sharp",
    "weird food photography: a hamburger made of jelly and blue cheese, studio lighting, award-winning",
    "the front page of a newspaper, dense columns of text, headline, photographs, (black and white)++",
    "a portrait of an old fisherman with a grey beard, 85mm, natural light, (detailed skin)+",
    "a city street at night in the rain, neon signs reflected in puddles, cinematic",
    "a bowl of ramen seen from above, (watercolor)++",
    "two hands playing the piano, close-up, soft window light",
    "a red fox sitting in the snow, (oil on canvas)+++, impressionist brush strokes",
    "an astronaut riding a horse on the moon, photorealistic",
    "a cozy library with tall shelves and a spiral staircase, warm lamps, (digital painting)+",
    "a crowded market in Marrakesh at noon, spices in baskets, wide angle",
)


def read_prompts_file(path: str | Path) -> tuple[str, ...]:
    """One prompt per line (UTF-8); blank lines and lines starting with ``#`` are skipped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidConfigError(f"--prompts-file {str(path)!r} is not a file; give a text file, one prompt a line")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidConfigError(f"--prompts-file {str(path)!r} is not UTF-8 text ({exc})") from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise InvalidConfigError(f"--prompts-file {str(path)!r} holds no prompts; write one prompt per line")
    return prompts
