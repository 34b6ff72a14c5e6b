"""The real CLIP BPE tokenizer, built offline from the vocabulary file that open-clip-torch ships.

SDXL's two tokenizers are both the OpenAI CLIP BPE (49,408 tokens, 77 positions): ``tokenizer`` pads
with ``<|endoftext|>`` and ``tokenizer_2`` pads with ``!``. No model hub is needed: the merges come from
``open_clip/bpe_simple_vocab_16e6.txt.gz`` and the vocabulary is derived from them exactly as
open_clip's ``SimpleTokenizer`` derives it, so token ids agree with open_clip's tokenizer on ordinary text.

Two known differences, both also true of the transformers tokenizers that SDXL checkpoints ship: there is
no ftfy/HTML clean-up (``&amp;``, ligatures and fullwidth letters tokenize as written), and ``tokenizer_2``
treats its pad token ``!`` as a special token, so each ``!`` in a prompt becomes id 0.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

from sdxl_core.errors import MissingDependencyError

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
MAX_LENGTH = 77


def open_clip_vocab_path() -> Path:
    """Path of the BPE merges file inside the installed open-clip-torch package (without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "open-clip-torch is not installed; it ships the CLIP BPE vocabulary that sdxl-bench builds its "
            "tokenizers from. Fix: pip install open-clip-torch"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / VOCAB_FILENAME
    if not path.is_file():
        raise MissingDependencyError(f"{path} is missing from the open-clip-torch install; reinstall open-clip-torch")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-unicode table of GPT-2 / CLIP BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP vocabulary (token -> id) and BPE merges, as open_clip's SimpleTokenizer builds them."""
    lines = gzip.open(open_clip_vocab_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    tokens = list(_bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens.extend("".join(m) for m in merges)
    tokens.extend(["<|startoftext|>", "<|endoftext|>"])
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocabulary has {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def build_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A ``transformers.CLIPTokenizer`` with the real CLIP vocabulary; ``pad_token="!"`` gives SDXL's ``tokenizer_2``."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=MAX_LENGTH)


def write_vocab_files(folder: str | Path) -> None:
    """Store a saved CLIP tokenizer folder as the SDXL 1.0 repositories do: ``vocab.json`` + ``merges.txt``
    instead of transformers' ``tokenizer.json`` (a third of the size). ``CLIPTokenizer.from_pretrained`` reads
    either; the vocabulary is the real CLIP one (:func:`clip_vocab_and_merges`)."""
    import json

    folder = Path(folder)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    (folder / "tokenizer.json").unlink(missing_ok=True)
