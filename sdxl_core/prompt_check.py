"""Check prompts before a run: too long for the text encoders, or compel syntax that does not parse as meant.

What compel 2.5.1 does with these prompts (verified against its source and parser; ``PromptEncoder`` in
:mod:`sdxl_core.generate` builds ``Compel`` without ``truncate_long_prompts``, so the default ``True`` applies,
for the base and the refiner alike):

* **Long prompts are truncated.** Each text encoder (CLIP ViT-L and OpenCLIP bigG, both 77 positions) gets the
  start token, the first 75 prompt tokens and the end token; compel drops every token after the 75th, so the
  words there have no effect on the image. It does *not* split long prompts into 77-token chunks (it would only
  with ``truncate_long_prompts=False``). The count is taken after compel's weighting syntax is removed, as compel
  tokenizes only the text fragments. Each part of a ``("...", "...").and()`` / ``.blend()`` is encoded on its
  own, so each part has its own 75-token budget; :attr:`PromptCheck.n_tokens` is that of the longest part.
  (The pooled embedding that compel takes from encoder 2 reads the raw prompt string, syntax included, also cut
  at 77 tokens. With ``--no-compel`` diffusers truncates at 77 tokens too.)
* **Automatic1111 weights are plain text.** ``(cat:1.3)`` parses to the fragment ``'cat:1 . 3'`` at weight 1.0:
  the parentheses are dropped, no weight is applied, and ``: 1 . 3`` become tokens of the prompt. ``[cat]``
  stays the literal text ``'[cat]'``. The compel forms are ``(cat)1.3`` and ``(cat)-`` (each ``-`` is x0.9,
  each ``+`` x1.1).
* **Unbalanced parentheses are literal text.** ``a (cat`` parses to the fragment ``'a (cat'``; the unmatched
  parenthesis becomes a token and weights in the same group can be lost (``((a)1.2`` keeps no weight at all).
  An escaped ``\\(`` is a deliberate literal parenthesis and is not reported.
* **Deeply nested parentheses stall compel's parser** as it ships. Its grammar takes time exponential in the
  nesting depth (measured on 2 CPU cores: depth 4 about 0.5 s, 5 about 1-3 s, 6 about 6-13 s, ~5x per level;
  ``(a `` repeated 50 times raises ``RecursionError``). sdxl-bench's generation turns pyparsing's packrat cache
  on (:class:`sdxl_core.generate.PromptEncoder`), which parses depth 7 in 10 ms instead of 20 s, but other tools
  that use compel do not, and ~40 levels raise ``RecursionError`` either way. Prompts nested deeper than
  :data:`MAX_PARSE_DEPTH` get a ``deep-nesting`` warning and are not given to the parser here: their token count
  is estimated with the parentheses and weight markers stripped.
* **Operators on unquoted text are plain text.** ``a cat.and()`` parses to the single fragment ``'a cat.and()'``
  and ``(a cat, a dog).and()`` to ``'a cat , a dog .and()'`` (``.and()`` is tokenized as words); the
  conjunction needs quoted prompts: ``("a cat", "a dog").and()`` (likewise ``.blend(0.7, 0.3)``).

Every warning is one of the templates below, formatted; each starts with its stable code and a colon
(``"too-long: ..."``), which :attr:`PromptCheck.codes` lists. Nothing is logged.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Iterable, Iterator

from sdxl_core.errors import InvalidConfigError
from sdxl_core.tokenizer import MAX_LENGTH

#: start + end markers: the usable part of the 77-token context is 75 tokens.
SPECIAL_TOKENS = 2
#: Deepest parenthesis nesting that is handed to compel's (exponential-time) parser.
MAX_PARSE_DEPTH = 4
#: At most this many unmatched parentheses are listed one by one; the rest are counted in one warning.
MAX_LISTED = 5

# Warning codes: each warning text starts with "<code>: ".
TOO_LONG = "too-long"
DEEP_NESTING = "deep-nesting"
UNBALANCED_PARENTHESIS = "unbalanced-parenthesis"
A1111_WEIGHT = "a1111-weight"
A1111_BRACKETS = "a1111-brackets"
A1111_LORA = "a1111-lora"
OPERATOR_AS_TEXT = "operator-as-text"
UNBALANCED_MORE = "unbalanced-parenthesis-more"  # a template key only: its text starts "unbalanced-parenthesis: "

#: The warning texts (``str.format`` templates). ``pos`` is a 1-based character position in the prompt.
WARNINGS: dict[str, str] = {
    TOO_LONG: (
        "too-long: {where}{n_tokens} tokens (start/end included) is over the text encoders' {max_tokens}-token "
        "context; compel truncates it to {max_tokens} tokens, so the words after token {usable} have no effect "
        "(dropped: {dropped!r}). Shorten the prompt to {usable} tokens or fewer"),
    UNBALANCED_PARENTHESIS: (
        "unbalanced-parenthesis: {char!r} at character {pos} has no matching {other!r} (near {context!r}); compel "
        "keeps it as literal text and the weighting around it can be lost. Balance it, or escape it as \\{char}"),
    DEEP_NESTING: (
        "deep-nesting: {depth} levels of nested parentheses (deepest '(' at character {pos}); compel's prompt "
        "parser as it ships takes time exponential in the depth (seconds at 5 levels, ~5x more per level; "
        "sdxl-bench parses with pyparsing's packrat cache, which avoids that, but other compel users do not) and "
        "raises RecursionError at ~40 levels. Flatten it: one group with a weight, e.g. ((((word)))) -> "
        "(word)1.5; the token count is estimated without compel's parser"),
    UNBALANCED_MORE: (
        "unbalanced-parenthesis: {n} more unmatched parentheses are not listed"),
    A1111_WEIGHT: (
        "a1111-weight: {found!r} at character {pos} is Automatic1111 syntax; compel reads it as plain text (weight "
        "1.0, and the number becomes words of the prompt). Write {fix!r} (compel form: (words)weight)"),
    A1111_BRACKETS: (
        "a1111-brackets: {found!r} at character {pos} is Automatic1111 syntax; compel reads square brackets as "
        "plain text. {fix}"),
    A1111_LORA: (
        "a1111-lora: {found!r} at character {pos} is an Automatic1111 LoRA tag; compel reads it as plain text and "
        "loads nothing. Remove it and pass the LoRA with --lora"),
    OPERATOR_AS_TEXT: (
        "operator-as-text: {found!r} at character {pos} is read by compel as plain text, not as an operator: it "
        "needs {fix}"),
}


@dataclass(frozen=True)
class PromptCheck:
    """The result of :func:`check_prompt`.

    ``n_tokens``: tokens compel feeds the encoder for the longest part of the prompt, start/end included and
    before truncation (``None`` only when counting was skipped with ``tokenizer=False``); ``max_tokens``: the
    encoder context (77); ``truncated``: ``n_tokens > max_tokens``.
    """

    prompt: str
    warnings: tuple[str, ...]
    n_tokens: int | None
    max_tokens: int
    truncated: bool

    @property
    def codes(self) -> tuple[str, ...]:
        """The warning codes (``"too-long"``, ``"a1111-weight"``, ...), one per warning, in order."""
        return tuple(w.split(":", 1)[0] for w in self.warnings)

    @property
    def ok(self) -> bool:
        return not self.warnings

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["warnings"] = list(self.warnings)
        return d


@lru_cache(maxsize=1)
def default_tokenizer() -> Any:
    """The real CLIP BPE tokenizer (offline, from open_clip's vocabulary); both SDXL encoders count alike."""
    from sdxl_core.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer()


def check_prompt(text: str, tokenizer: Any = None) -> PromptCheck:
    """Check one prompt: token count against the 77-token context and compel syntax that is not read as meant.

    ``tokenizer``: a ``transformers`` CLIP tokenizer (default: :func:`default_tokenizer`); ``False`` skips the
    token count. Raises :class:`~sdxl_core.errors.InvalidConfigError` for a non-string, an empty prompt, or one
    with no words left once compel's syntax is removed.
    """
    if not isinstance(text, str):
        raise InvalidConfigError(f"prompt {text!r} is a {type(text).__name__}, not a string; pass the prompt text")
    if not text.strip():
        raise InvalidConfigError("prompt is empty; give each prompt some text (remove blank lines from --prompts-file)")

    masked = _mask_escapes(text)
    depth, deepest = _max_depth(masked)
    warnings: list[str] = []
    if depth > MAX_PARSE_DEPTH:
        warnings.append(WARNINGS[DEEP_NESTING].format(depth=depth, pos=deepest + 1))
        parts = [[[_strip_syntax(text, masked)]]]
    else:
        with parse_cache_released():
            conjunction = compel_parser().parse_conjunction(text)
        parts = [_part_variants(p) for p in _flat_prompts(conjunction)]
    parts = [p for p in parts if any(f.strip() for fragments in p for f in fragments)]
    if not parts:
        raise InvalidConfigError(f"prompt {text!r} has no words once compel's syntax is removed; give it some text")

    warnings += _unbalanced(text, masked)
    warnings += _a1111(masked)
    warnings += _operators_as_text(text, masked, parts)

    n_tokens: int | None = None
    max_tokens = MAX_LENGTH
    if tokenizer is not False:
        tok = default_tokenizer() if tokenizer is None else tokenizer
        max_tokens = _max_tokens(tok)
        usable = max_tokens - SPECIAL_TOKENS
        for i, variants in enumerate(parts):
            fragments, ids = max(((f, _token_ids(tok, f)) for f in variants), key=lambda v: len(v[1]))
            n = len(ids) + SPECIAL_TOKENS
            if n_tokens is None or n > n_tokens:
                n_tokens = n
            if n > max_tokens:
                where = (f"part {i + 1} of {len(parts)} (each .and()/.blend() part is encoded alone): "
                         if len(parts) > 1 else "")
                dropped = _shorten(_dropped_text(tok, fragments, ids[usable:]))
                warnings.insert(0, WARNINGS[TOO_LONG].format(where=where, n_tokens=n, max_tokens=max_tokens,
                                                             usable=usable, dropped=dropped))
    truncated = n_tokens is not None and n_tokens > max_tokens
    return PromptCheck(prompt=text, warnings=tuple(warnings), n_tokens=n_tokens, max_tokens=max_tokens,
                       truncated=truncated)


def check_prompts(prompts: Iterable[str], tokenizer: Any = None) -> list[PromptCheck]:
    """:func:`check_prompt` for each prompt (one tokenizer for all); errors name the prompt's 1-based number.

    An empty list is an :class:`~sdxl_core.errors.InvalidConfigError`, as in ``sdxl_core.generate.check_prompts``.
    """
    if isinstance(prompts, (str, bytes)):
        raise InvalidConfigError(f"prompts {prompts!r} is a single string; pass a list of prompts")
    prompts = list(prompts)
    if not prompts:
        raise InvalidConfigError("the prompt list is empty; give at least one prompt")
    tok = default_tokenizer() if tokenizer is None else tokenizer
    out = []
    for i, p in enumerate(prompts):
        try:
            out.append(check_prompt(p, tokenizer=tok))
        except InvalidConfigError as exc:
            raise InvalidConfigError(f"prompt #{i + 1}: {exc}") from exc
    return out


# ------------------------------------------------------------------------- compel's parser, process-wide

def set_packrat_parsing(on: bool) -> None:
    """Switch pyparsing's packrat memoisation (process-wide) on or off.

    compel parses every prompt with a pyparsing grammar that backtracks a lot; packrat caching returns the
    same parse (``tests/test_generate.py`` compares them) in about half the time (18.7 -> 10.5 ms for the
    speed suite's prompt on a 2-core CI machine)."""
    import pyparsing

    if on:
        pyparsing.ParserElement.enable_packrat()
    else:
        pyparsing.ParserElement.disable_memoization()


@contextlib.contextmanager
def parse_cache_released() -> Iterator[None]:
    """Empty pyparsing's packrat cache as the block ends (run compel's parser inside it).

    With packrat on (:func:`set_packrat_parsing`), the cache keeps the parse's exceptions, and
    their tracebacks keep every frame that called the parser alive with its locals (for a prompt encoded in
    ``generate``: the pipelines, and on a GPU their memory) until the next parse; pyparsing itself empties the
    cache only when a parse starts. Each parse starts from an empty cache anyway, so nothing is lost."""
    import pyparsing

    try:
        yield
    finally:
        pyparsing.ParserElement.reset_cache()


@lru_cache(maxsize=1)
def compel_parser() -> Any:
    """One compel ``PromptParser`` for the process (its grammar holds no state between parses; building it costs
    a few milliseconds). Parse inside :func:`parse_cache_released`."""
    from compel.prompt_parser import PromptParser

    return PromptParser()


# ----------------------------------------------------------------------------------------------- helpers


def _max_depth(masked: str) -> tuple[int, int]:
    """Deepest parenthesis nesting (unclosed ones count) and where it is reached."""
    depth = best = 0
    where = -1
    for i, ch in enumerate(masked):
        if ch == "(":
            depth += 1
            if depth > best:
                best, where = depth, i
        elif ch == ")" and depth:
            depth -= 1
    return best, where


def _strip_syntax(text: str, masked: str) -> str:
    """Plain text without compel's parser: parentheses and ``)weight`` markers removed, escapes undone."""
    out, i = [], 0
    for m in re.finditer(r"\)(?:[+-]+|\d+(?:\.\d+)?)?|\(", masked):
        out += [text[i: m.start()], " "]
        i = m.end()
    out.append(text[i:])
    return re.sub(r"\s+", " ", re.sub(r"\\(.)", r"\1", "".join(out))).strip()


def _flat_prompts(conjunction: Any) -> list[Any]:
    """The FlattenedPrompts that compel encodes one by one (``.and()`` parts, ``.blend()`` members)."""
    out = []
    for p in conjunction.prompts:
        out.extend(p.prompts if type(p).__name__ == "Blend" else [p])
    return out


def _part_variants(flat: Any) -> list[list[str]]:
    """Text fragments of one FlattenedPrompt as compel tokenizes them: one list, or two with a ``.swap()``
    (the original and the edited prompt, both encoded)."""
    original: list[str] = []
    edited: list[str] = []
    for child in flat.children:
        if type(child).__name__ == "CrossAttentionControlSubstitute":
            original += [f.text for f in child.original]
            edited += [f.text for f in child.edited]
        else:
            original.append(getattr(child, "text", ""))
            edited.append(getattr(child, "text", ""))
    return [original] if original == edited else [original, edited]


def _token_ids(tokenizer: Any, fragments: list[str]) -> list[tuple[int, int, int]]:
    """``(token id, fragment index, start character)`` per token, as compel's EmbeddingsProvider tokenizes:
    each fragment alone, start/end markers dropped, concatenated."""
    out: list[tuple[int, int, int]] = []
    for k, f in enumerate(fragments):
        # verbose=False: transformers would otherwise log a "sequence too long" warning.
        try:
            enc = tokenizer(f, add_special_tokens=False, truncation=False, verbose=False, return_offsets_mapping=True)
            starts = [a for a, _ in enc["offset_mapping"]]
        except (NotImplementedError, TypeError, ValueError, KeyError):  # a slow tokenizer: no offsets
            enc = tokenizer(f, add_special_tokens=False, truncation=False, verbose=False)
            starts = [-1] * len(enc["input_ids"])
        out += [(i, k, a) for i, a in zip(enc["input_ids"], starts)]
    return out


def _dropped_text(tokenizer: Any, fragments: list[str], tokens: list[tuple[int, int, int]]) -> str:
    """The prompt text from the first dropped token on, as written (decoded tokens when offsets are missing)."""
    _, k, start = tokens[0]
    if start < 0:
        return tokenizer.decode([t[0] for t in tokens]).strip()
    return " ".join(x.strip() for x in [fragments[k][start:], *fragments[k + 1:]] if x.strip())


def _max_tokens(tokenizer: Any) -> int:
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n <= 4096 else MAX_LENGTH


def _shorten(s: str, limit: int = 60) -> str:
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _mask_escapes(text: str) -> str:
    """``text`` with each backslash escape (``\\(``) replaced by two NULs, so positions stay the same."""
    return re.sub(r"\\.", "\0\0", text, flags=re.S)


def _context(text: str, i: int, width: int = 12) -> str:
    return text[max(0, i - width): i + width + 1]


def _unbalanced(text: str, masked: str) -> list[str]:
    stack: list[int] = []
    found: list[tuple[int, str]] = []
    for i, ch in enumerate(masked):
        if ch == "(":
            stack.append(i)
        elif ch == ")":
            if stack:
                stack.pop()
            else:
                found.append((i, ")"))
    found += [(i, "(") for i in stack]
    found.sort()
    out = [WARNINGS[UNBALANCED_PARENTHESIS].format(char=ch, other="(" if ch == ")" else ")", pos=i + 1,
                                                   context=_context(text, i))
           for i, ch in found[:MAX_LISTED]]
    if len(found) > MAX_LISTED:
        out.append(WARNINGS[UNBALANCED_MORE].format(n=len(found) - MAX_LISTED))
    return out


_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_A1111_WEIGHT_RE = re.compile(r"\(([^()\[\]:]+?)\s*:\s*(" + _NUM + r")\s*\)")
_BRACKETS_RE = re.compile(r"\[([^\[\]]*)\]")
_LORA_RE = re.compile(r"<\s*(?:lora|lyco|hypernet)\s*:[^<>]*>", re.I)
_OPERATOR_FIX = {
    "and": 'its prompts in quotes: ("a cat", "a dog").and()',
    "blend": 'its prompts in quotes and one weight each: ("a cat", "a dog").blend(0.7, 0.3)',
    "swap": "a word or a parenthesised group before it: a (red cat).swap(blue dog)",
}
_OPERATOR_RE = re.compile(r"\.\s*(and|blend|swap)\s*\(")


def _a1111(masked: str) -> list[str]:
    hits: list[tuple[int, str]] = []
    for m in _A1111_WEIGHT_RE.finditer(masked):
        words, weight = m.group(1).strip(), m.group(2)
        fix = f"({words}){_format_weight(weight)}"
        hits.append((m.start(), WARNINGS[A1111_WEIGHT].format(found=m.group(0), pos=m.start() + 1, fix=fix)))
    for m in _BRACKETS_RE.finditer(masked):
        inner = m.group(1).strip()
        if inner and not re.search(r"[|:]", inner):
            fix = f"For less weight write {f'({inner})-'!r} (each - is x0.9)."
        else:
            fix = ("Alternation [a|b] has no compel form; for prompt editing [a:b:when] use a.swap(b); "
                   "otherwise remove the brackets.")
        hits.append((m.start(), WARNINGS[A1111_BRACKETS].format(found=m.group(0), pos=m.start() + 1, fix=fix)))
    for m in _LORA_RE.finditer(masked):
        hits.append((m.start(), WARNINGS[A1111_LORA].format(found=m.group(0), pos=m.start() + 1)))
    return [w for _, w in sorted(hits, key=lambda h: h[0])]


def _format_weight(weight: str) -> str:
    try:
        return format(float(weight), "g")
    except ValueError:
        return weight


def _operators_as_text(text: str, masked: str, parts: list[list[list[str]]]) -> list[str]:
    # An operator that compel applied is gone from the fragments; one still in a fragment was read as text.
    literal = {m.group(1) for variants in parts for fragments in variants for f in fragments
               for m in _OPERATOR_RE.finditer(f)}
    out = []
    for m in _OPERATOR_RE.finditer(masked):
        if m.group(1) in literal:
            end = m.end() + 1 if masked[m.end(): m.end() + 1] == ")" else m.end()
            out.append(WARNINGS[OPERATOR_AS_TEXT].format(found=text[m.start(): end], pos=m.start() + 1,
                                                         fix=_OPERATOR_FIX[m.group(1)]))
    return out
