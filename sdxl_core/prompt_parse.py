"""compel's prompt parse, by a direct scan for plain words and weighted groups, and by compel's parser otherwise.

compel parses every prompt with a pyparsing grammar of its whole syntax (blends, conjunctions, swaps, LoRA
triggers, quoting, escapes). For the syntax most prompts use, plain words and parenthesised groups weighted with
``+``/``-`` runs or a number (``a wolf, (oil on canvas)+++, highly detailed``), :func:`fast_parse` computes the same
``Conjunction`` directly, about 100x faster (the parse is ~10 ms of a ~20 ms compel call on this CPU). Whatever it
does not recognise it leaves to compel's own parser (:func:`parse`), so every prompt gets compel's result: the
tests compare the two on generated prompts, near misses included. The parse still happens for every prompt and
every call; nothing is remembered between prompts.

Which strings the scan takes is deliberately narrow; each rule mirrors compel's grammar:

* compel first rewrites ``,x`` to ``, x``; so does the scan;
* tokens are separated by spaces only (other whitespace goes to compel);
* a plain word is a run of ``A-Za-z0-9,.'!?:;`` and of hyphens between letters or digits (no parentheses, quotes,
  ``+``, other ``-``, ``=``, backslashes, so none of compel's operators can start inside it); compel reads it as a
  ``free_word`` fragment of weight 1;
* a group is ``(`` words of ``A-Za-z0-9'`` (and such hyphens) separated by spaces ``)`` followed at once by ``+``s,
  ``-``s or a number
  ``D`` / ``D.D``, then a space, a comma or the end; its words get weight ``1.1 ** n``, ``0.9 ** n`` or the number
  (compel's ``pow``/``float``);
* neighbouring fragments of equal weight are joined with one space, as compel's ``fuse_fragments`` does.
"""

from __future__ import annotations

import functools
import re
from typing import Any

_COMMA = re.compile(r",(\S)")  # compel's own rewrite, first thing in PromptParser.parse_conjunction
_HYPHEN = r"(?<=[A-Za-z0-9])-(?=[A-Za-z0-9])"  # inside a word, as in close-up; compel's word rule keeps it
_WORD = re.compile(rf"(?:[A-Za-z0-9,.'!?:;]|{_HYPHEN})+\Z")
_INNER = rf"(?:[A-Za-z0-9']|{_HYPHEN})+"
_GROUP = re.compile(rf"\( *({_INNER}(?: +{_INNER})*) *\)(\++|-+|[0-9]+\.[0-9]+|[0-9]+)(?=[ ,]|\Z)")
PLUS_BASE = 1.1  # compel's PromptParser defaults (attention_plus_base, attention_minus_base)
MINUS_BASE = 0.9


def _weight(op: str) -> float:
    if op[0] == "+":
        return pow(PLUS_BASE, len(op))
    if op[0] == "-":
        return pow(MINUS_BASE, len(op))
    return float(op)


def _fragments(prompt: str) -> list[tuple[str, float]] | None:
    """(text, weight) of each word in order, or None where the prompt leaves the scanned syntax."""
    out: list[tuple[str, float]] = []
    pos = 0
    while pos < len(prompt):
        if prompt[pos] == " ":
            pos += 1
            continue
        if prompt[pos] == "(":
            group = _GROUP.match(prompt, pos)
            if group is None:
                return None
            weight = 1.0 * _weight(group.group(2))
            out.extend((word, weight) for word in group.group(1).split())
            pos = group.end()
            continue
        end = prompt.find(" ", pos)
        word = prompt[pos:] if end < 0 else prompt[pos:end]
        if not _WORD.match(word):
            return None
        out.append((word, 1.0))
        pos += len(word)
    return out


def fast_parse(prompt: str) -> Any | None:
    """compel's ``Conjunction`` for ``prompt`` when it uses only the scanned syntax, else None."""
    from compel.prompt_parser import Conjunction, FlattenedPrompt, Fragment

    prompt = _COMMA.sub(r", \1", prompt)
    if not prompt.strip():
        return None  # compel has a special case for the empty prompt
    words = _fragments(prompt)
    if not words:
        return None
    fused: list[list[Any]] = []
    for text, weight in words:
        if fused and fused[-1][1] == weight:
            fused[-1][0] += " " + text
        else:
            fused.append([text, weight])
    return Conjunction([FlattenedPrompt([Fragment(text, weight) for text, weight in fused])], [1.0])


def parse(prompt: str) -> Any:
    """compel's ``Conjunction`` for ``prompt``: the scan where it applies, compel's parser (one grammar for the
    process) otherwise."""
    conjunction = fast_parse(prompt)
    if conjunction is not None:
        return conjunction
    from sdxl_core.prompt_check import compel_parser, parse_cache_released

    with parse_cache_released():
        return compel_parser().parse_conjunction(prompt)


def compel_class(fast: bool) -> type:
    """``compel.Compel``, or with ``fast`` its subclass that parses with :func:`parse` (the rest unchanged)."""
    from compel import Compel

    return _fast_parse_compel() if fast else Compel


@functools.cache
def _fast_parse_compel() -> type:
    from compel import Compel

    class FastParseCompel(Compel):
        @classmethod
        def parse_prompt_string(cls, prompt_string: str) -> Any:
            return parse(prompt_string)

    return FastParseCompel
