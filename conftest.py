"""Shared pytest setup for sdxl-bench: offline hub, markers, and the session-wide tiny pipelines."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# One intra-op thread by default: the tiny models' ops are too small to gain from more, and on a shared
# 2-core machine an OpenMP team that loses a core to another process stalls at every barrier (measured: a
# 4-step 64x64 generation 0.3 s with one thread, 15-20 s with two under load). Override with
# SDXL_BENCH_TEST_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SDXL_BENCH_TEST_THREADS", "1"))

import pytest  # noqa: E402

# The sdxl-bench plugin (--sdxl-* options, markers gpu/slow/bench with their skips); also a pytest11 entry point
# once the package is installed.
pytest_plugins = ["sdxl_core.pytest_plugin"]


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("SDXL_BENCH_TEST_THREADS", "1")))
    # numpy 2 deprecation inside diffusers' Euler scheduler, once per pipeline call: not ours to fix.
    config.addinivalue_line("filterwarnings",
                            "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


@pytest.fixture(scope="session", autouse=True)
def _quiet_library_logs():
    """diffusers/transformers warn on every load and dtype cast; keep test output readable."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    yield


def _fingerprint(pipes) -> dict:
    """What must not change on the shared pipelines: dtypes, attention processors, adapters, weights."""
    import torch

    fp = {}
    mods = {"unet": pipes.base.unet, "unet_refiner": pipes.refiner.unet, "vae": pipes.base.vae,
            "text_encoder": pipes.base.text_encoder, "text_encoder_2": pipes.base.text_encoder_2}
    for name, m in mods.items():
        with torch.no_grad():
            total = sum(float(p.double().sum()) for p in m.parameters())
        fp[name] = (str(m.dtype), len(list(m.parameters())), total,
                    sorted({type(p).__name__ for p in getattr(m, "attn_processors", {}).values()}),
                    bool(getattr(m, "peft_config", None)))
    fp["vae_force_upcast"] = pipes.base.vae.config.force_upcast
    return fp


@pytest.fixture(scope="session")
def tiny_pipes():
    """The tiny base + refiner, built once into the preset cache and loaded back from disk (float32, CPU).

    Shared by the whole session: tests must not change it (no LoRA, no apply_level, no dtype casts). The
    teardown checks that nobody did.
    """
    from sdxl_core.loading import load_pipelines

    pipes = load_pipelines("tiny", "tiny", device="cpu")
    before = _fingerprint(pipes)
    yield pipes
    assert _fingerprint(pipes) == before, "a test mutated the shared tiny_pipes fixture"


@pytest.fixture(scope="session")
def fast_settings():
    """Small, quick generation settings for the tiny models (64x64, 6 steps, base/refiner split 4+2)."""
    from sdxl_core.generate import GenerationSettings

    return GenerationSettings(steps=6, width=64, height=64)
