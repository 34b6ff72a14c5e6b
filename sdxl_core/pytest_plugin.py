"""The sdxl-bench pytest plugin: ``--sdxl-*`` options, the resolved ``sdxl_config``, markers, machine info.

Registered through the ``pytest11`` entry point (and by the repository's ``conftest.py``). A thin layer: the
options are resolved by :mod:`sdxl_core.bench_config` (command line over ``[tool.sdxl-bench]`` in the
rootdir's ``pyproject.toml`` over defaults).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from sdxl_core.bench_config import OPTION_KEYS, BenchConfig, option_name, read_pyproject, resolve

HELP = {
    "base": "base model: tiny, sdxl-random, a hub id or a diffusers folder",
    "refiner": "refiner model (default: tiny with a tiny base, else none)",
    "vae": "VAE override, e.g. madebyollin/sdxl-vae-fp16-fix or a folder",
    "lora": "NAME@VERSION=PATH of a LoRA for the base; repeat for several versions",
    "prompts": "prompt file (txt, jsonl or yaml); default: the built-in set",
    "seeds": "comma-separated seeds (default 0,1)",
    "steps": "denoising steps, base + refiner (default 50; 20 for tiny)",
    "guidance_scale": "classifier-free guidance scale (default 13; 5 for toy)",
    "high_noise_frac": "fraction of the steps on the base (default 0.8)",
    "size": "image width = height (default 1024; 128 for tiny)",
    "variants": "comma-separated variants: baseline, wrong_negative, wrong_lora and declared ones",
    "reference": "folder of real images for FID/KID/CMMD (default: shift from the baseline variant)",
    "clip_model": "open_clip MODEL:PRETRAINED, MODEL:/path/weights or MODEL:smoke for CLIP score "
                  "(default ViT-L-14:openai; ViT-B-32:smoke with the tiny base)",
    "fid_features": "FID/KID features: inception (needs its weights) or effnet-lite0 (offline; default with tiny)",
    "run_dir": "folder of run folders (default reports)",
    "run_id": "run folder name; reuse it to resume a run (default: a new id)",
}
MARKERS = {
    "gpu": "needs a CUDA device (skipped without one)",
    "slow": "real or full-size weights, long runs (opt-in with --run-slow)",
    "bench": "a benchmark suite case (bench/)",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sdxl", "sdxl-bench (same keys under [tool.sdxl-bench] in pyproject.toml)")
    for key in OPTION_KEYS:
        kwargs: dict[str, Any] = {"dest": f"sdxl_{key}", "default": None, "help": HELP.get(key, key)}
        if key == "lora":
            kwargs["action"] = "append"
        group.addoption(option_name(key), **kwargs)
    group.addoption("--run-slow", action="store_true", default=False,
                    help="also run tests marked slow (real or full-size weights, long CPU runs)")
    group.addoption("--sdxl-compare", dest="sdxl_compare", default=None, metavar="RUN",
                    help="after the run, compare it with this earlier run folder (regression gate)")
    group.addoption("--sdxl-fail-on", dest="sdxl_fail_on", action="append", default=[], metavar="RULE",
                    help="fail the session on a regression against --sdxl-compare, e.g. clip:-0.5 or fid:+5%%")


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    if distributed_world_size() > 1:
        _setup_distributed(config)
    elif hasattr(config, "workerinput"):  # a pytest-xdist worker: the controller's run id
        if "sdxl_run_id" in config.workerinput:
            config.stash[_RUN_ID_KEY] = config.workerinput["sdxl_run_id"]
    elif getattr(config.option, "numprocesses", None):  # the pytest-xdist controller (-n N)
        from sdxl_core.bench_run import new_run_id

        config.stash[_RUN_ID_KEY] = config.getoption("sdxl_run_id") or new_run_id()
        config.stash[_XDIST_KEY] = True


_XDIST_KEY = pytest.StashKey[bool]()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist: every worker writes into the controller's run (one run id, one folder)."""
    node.workerinput["sdxl_run_id"] = node.config.stash[_RUN_ID_KEY]


def _finish_xdist(config: pytest.Config) -> None:
    """The controller scores and reports once, after all workers are done, if they made images."""
    from sdxl_core.bench_run import BenchRun
    from sdxl_core.lora_files import lora_record, parse_lora_spec, resolve_lora_file
    from sdxl_core.results_schema import IMAGES_LOG

    bench = replace(resolve_config(config), run_id=config.stash[_RUN_ID_KEY])
    run = BenchRun(bench, root=config.rootpath)
    if not (run.folder / IMAGES_LOG).exists():
        return
    specs = [parse_lora_spec(s) for s in bench.lora]
    _finish(config, run, [lora_record(s, resolve_lora_file(s)).as_dict() for s in specs])


# ------------------------------------------------------------------------------------------------ scale-out
# Under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) every process runs the same pytest command: the cases
# are split between processes with accelerate's split_between_processes, each process writes its images and
# log lines into the one run folder, and after a barrier the main process scores and reports once.

_STATE_KEY = pytest.StashKey[Any]()
_RUN_ID_KEY = pytest.StashKey[str]()
_PENDING_KEY = pytest.StashKey[Any]()


def distributed_world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _setup_distributed(config: pytest.Config) -> None:
    """All processes: start accelerate's process group and agree on one run id (the main process's)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes talk over gloo
    run_id = [config.getoption("sdxl_run_id")]
    if run_id[0] is None:
        from sdxl_core.bench_run import new_run_id

        run_id = [new_run_id() if state.is_main_process else None]
        broadcast_object_list(run_id, from_process=0)
    config.stash[_STATE_KEY] = state
    config.stash[_RUN_ID_KEY] = run_id[0]


def _shard(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep this process's share of the cases (a contiguous, deterministic split); other tests run on the main
    process only."""
    state = config.stash[_STATE_KEY]
    case_items = [it for it in items if "sdxl_case" in getattr(getattr(it, "callspec", None), "params", {})]
    with state.split_between_processes([it.nodeid for it in case_items]) as mine:
        keep = set(mine)
    selected = [it for it in items if it.nodeid in keep or (it not in case_items and state.is_main_process)]
    deselected = [it for it in items if it not in selected]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``slow`` runs only with --run-slow; ``gpu`` is skipped without a CUDA device; under torchrun/accelerate
    each process keeps its share of the cases."""
    if _STATE_KEY in config.stash:
        _shard(config, items)
    run_slow = config.getoption("--run-slow")
    cuda = None
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: pass --run-slow to run it"))
        if "gpu" in item.keywords:
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="gpu: no CUDA device"))


def resolve_config(config: pytest.Config) -> BenchConfig:
    """The session's :class:`BenchConfig`; bad values stop the session with the message that names the fix."""
    cli = {key: config.getoption(f"sdxl_{key}") for key in OPTION_KEYS}
    rootdir = config.rootpath
    try:
        return resolve(cli, read_pyproject(rootdir), str(rootdir / "pyproject.toml"))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture(scope="session")
def sdxl_config(pytestconfig: pytest.Config) -> BenchConfig:
    """The resolved ``--sdxl-*`` / ``[tool.sdxl-bench]`` configuration."""
    return resolve_config(pytestconfig)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that asks for ``sdxl_case`` runs once per case: variant x LoRA version x prompt x seed."""
    if "sdxl_case" in metafunc.fixturenames:
        from sdxl_core.bench_cases import expand_cases

        try:
            cases = expand_cases(resolve_config(metafunc.config))
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        metafunc.parametrize("sdxl_case", cases, ids=[c.id for c in cases])


@pytest.fixture(scope="session")
def sdxl_runner(sdxl_config: BenchConfig, pytestconfig: pytest.Config) -> Any:
    """The session's pipelines with every LoRA version loaded as its own adapter (switched per case)."""
    from sdxl_core.bench_cases import CaseRunner

    state = pytestconfig.stash.get(_STATE_KEY, None)
    return CaseRunner(sdxl_config, device=str(state.device) if state is not None else None)


@pytest.fixture(scope="session")
def sdxl_run(sdxl_config: BenchConfig, sdxl_runner: Any, pytestconfig: pytest.Config) -> Any:
    """The session's run folder; at the end the images are scored, ``results.json`` and the report written."""
    from sdxl_core.bench_run import BenchRun

    if _RUN_ID_KEY in pytestconfig.stash:
        sdxl_config = replace(sdxl_config, run_id=pytestconfig.stash[_RUN_ID_KEY])
    run = BenchRun(sdxl_config, root=pytestconfig.rootpath)
    yield run
    loras = [r.as_dict() for r in sdxl_runner.records]
    if hasattr(pytestconfig, "workerinput"):  # pytest-xdist: the controller scores once
        return
    if _STATE_KEY in pytestconfig.stash:  # scored once, by the main process, after every process is done
        pytestconfig.stash[_PENDING_KEY] = (run, loras)
        return
    _finish(pytestconfig, run, loras)


def _finish(config: pytest.Config, run: Any, loras: list[dict[str, Any]]) -> None:
    from sdxl_core.html_report import publish_run

    config.stash[_RESULTS_KEY] = run.finalize(loras=loras)
    config.stash[_REPORT_KEY] = publish_run(run.folder)  # the run's report, and the list of runs


_RESULTS_KEY = pytest.StashKey[Any]()
_REPORT_KEY = pytest.StashKey[Any]()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The regression gate: with ``--sdxl-compare RUN``, compare this session's results with RUN and fail the
    session on any ``--sdxl-fail-on`` rule that the change breaks."""
    config = session.config
    state = config.stash.get(_STATE_KEY, None)
    if state is not None:
        state.wait_for_everyone()
        if not state.is_main_process:
            return
        if _PENDING_KEY in config.stash:
            _finish(config, *config.stash[_PENDING_KEY])
    if config.stash.get(_XDIST_KEY, False):
        _finish_xdist(config)
    reference = config.getoption("sdxl_compare", None)
    if not reference:
        return
    if _RESULTS_KEY not in config.stash:
        config.stash[_GATE_KEY] = ["--sdxl-compare: this session wrote no results (run bench/test_quality.py)"]
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        return
    from sdxl_core.compare import gate_against

    try:
        failures = gate_against(config.stash[_RESULTS_KEY].parent, reference, config.getoption("sdxl_fail_on"))
    except ValueError as exc:  # a reference run that cannot be read, a bad rule: the gate fails, saying why
        failures = [f"cannot compare with {reference}: {exc}"]
    config.stash[_GATE_KEY] = failures or ["passed"]
    if failures:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_GATE_KEY = pytest.StashKey[list]()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for label, key in (("results", _RESULTS_KEY), ("report", _REPORT_KEY)):
        if key in config.stash:
            terminalreporter.write_line(f"sdxl-bench {label}: {config.stash[key]}")
    for line in config.stash.get(_GATE_KEY, []):
        terminalreporter.write_line(f"sdxl-bench gate: {line}")


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    """GPU name, driver, CUDA and the library versions a timing depends on, in pytest-benchmark's machine info."""
    from sdxl_core.provenance import gpu_info, library_versions

    machine_info["sdxl_bench"] = {"libraries": library_versions(), **gpu_info()}
