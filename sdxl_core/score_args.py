"""Command-line options of ``sdxl-bench score`` (no heavy imports, so building the parser stays cheap)."""

from __future__ import annotations

from typing import Any

#: What ``sdxl-bench score`` computes when ``--metrics`` is not given (plus ``oracle_accuracy`` when every prompt
#: is a toy-world caption: see :func:`sdxl_core.score.resolve_metrics`).
DEFAULT_METRICS = ("clip", "fid", "kid", "cmmd", "sanity")
#: Every metric ``--metrics`` accepts. ``oracle_accuracy`` (toy world only) judges each image against its prompt
#: with the exact oracle of :mod:`sdxl_core.toy.oracle`.
METRICS = DEFAULT_METRICS + ("oracle_accuracy",)


def add_arguments(p: Any) -> None:
    p.add_argument("--fake", required=True, help="a run folder (variants compared with baseline) or an image folder")
    p.add_argument("--reference", default=None, help="folder of real images for FID/KID/CMMD")
    p.add_argument("--prompts", default=None, help="one prompt per image, in file-name order (plain folders)")
    p.add_argument("--metrics", default=None,
                   help="comma-separated: " + ",".join(METRICS) + " (default " + ",".join(DEFAULT_METRICS)
                        + ", plus oracle_accuracy when every prompt is a toy-world caption)")
    p.add_argument("--features", default="inception", help="FID/KID features: inception or effnet-lite0 (offline)")
    p.add_argument("--feature-weights", default=None, help="weights file for the feature network")
    p.add_argument("--clip-model", default="ViT-L-14", help="open_clip model name")
    p.add_argument("--clip-pretrained", default=None, help="open_clip pretrained tag or a local weights file "
                                                            "(default openai)")
    p.add_argument("--clip-smoke", action="store_true", help="random CLIP weights: smoke values, not scores")
    p.add_argument("--resolution", type=int, default=None, help="centre-crop and resize images to this first")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (>= 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the result document here")
