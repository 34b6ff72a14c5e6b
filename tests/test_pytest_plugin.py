"""The pytest plugin: options, precedence over pyproject, usage errors, machine info."""

from __future__ import annotations

pytest_plugins = ["pytester"]

CONF_TEST = """
def test_config(sdxl_config):
    print("CONFIG", sdxl_config.base, sdxl_config.seeds, sdxl_config.lora, sdxl_config.guidance_scale)
"""


def test_options_and_pyproject_precedence(pytester):
    pytester.makepyprojecttoml('[tool.sdxl-bench]\nbase = "from-pyproject"\nseeds = [7]\nguidance-scale = 5\n')
    pytester.makepyfile(CONF_TEST)
    result = pytester.runpytest_inprocess("-s", "-p", "sdxl_core.pytest_plugin", "--sdxl-seeds", "1,2",
                                          "--sdxl-lora", "wrong@v1=/a", "--sdxl-lora", "wrong@v2=/b")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*CONFIG from-pyproject (1, 2) ('wrong@v1=/a', 'wrong@v2=/b') 5.0*"])


def test_bad_option_is_a_usage_error_naming_the_fix(pytester):
    pytester.makepyfile(CONF_TEST)
    result = pytester.runpytest_inprocess("-p", "sdxl_core.pytest_plugin", "--sdxl-fid-features", "vgg")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*--sdxl-fid-features 'vgg': choose from effnet-lite0, inception*"])


def test_markers_are_registered(pytester):
    result = pytester.runpytest_inprocess("-p", "sdxl_core.pytest_plugin", "--markers")
    result.stdout.fnmatch_lines(["*@pytest.mark.gpu: needs a CUDA device*", "*@pytest.mark.bench:*"])


def test_machine_info_hook():
    from sdxl_core.pytest_plugin import pytest_benchmark_update_machine_info

    info: dict = {}
    pytest_benchmark_update_machine_info(None, info)
    libs = info["sdxl_bench"]["libraries"]
    assert libs["torch"] and libs["diffusers"] and "gpu" in info["sdxl_bench"]
