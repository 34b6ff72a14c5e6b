"""Image metrics for sdxl-bench: per-image scores (CLIP score, sanity) and set metrics (FID, KID, CMMD).

Each metric is a torchmetrics-style class (``update()/compute()/reset()``, float64 running state) and carries
a :class:`~sdxl_core.metrics.meta.MetricInfo` that reports and comparisons read (display name, direction,
whether the value is a real score or a smoke value).
"""
