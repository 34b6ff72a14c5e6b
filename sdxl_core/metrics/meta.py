"""What a report and a comparison need to know about a metric, besides its value."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence


@dataclass(frozen=True)
class MetricInfo:
    """Metadata of one metric, saved with every result so reports are rendered from JSON alone.

    ``kind`` is ``"per_image"`` (one value per image, compared pairwise between variants) or ``"set"`` (one
    value per image set). ``label`` qualifies a value that is not the standard score: ``"smoke"`` for a
    randomly initialised CLIP (plumbing only, never a real score), ``"effnet-lite0 features"`` for FID/KID on
    the offline feature network (not comparable to Inception FID), ``"shift from baseline"`` for set metrics
    computed against the baseline variant instead of a reference set of real images.
    """

    name: str
    display_name: str
    higher_is_better: bool
    kind: Literal["per_image", "set"]
    unit: str = ""
    description: str = ""
    label: str | None = None

    @property
    def lower_is_better(self) -> bool:
        return not self.higher_is_better

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "lower_is_better": self.lower_is_better}


def add_bitmask(bits: Sequence[bool], counts: Any) -> int:
    """One image's yes/no answers (``bits[i]`` for name ``i``) as a bitmask int; adds them to ``counts``, the
    per-name running totals (a float64 tensor state of ``len(bits)``)."""
    mask = 0
    for i, bit in enumerate(bits):
        if bit:
            mask |= 1 << i
            counts[i] += 1
    return mask


def gathered_masks(state: Any) -> Any:
    """A per-image bitmask state (a list of int64 tensors, or one tensor after a distributed sync) as one tensor."""
    import torch

    if isinstance(state, torch.Tensor):
        return state
    return torch.cat(state) if state else torch.empty(0, dtype=torch.int64)
