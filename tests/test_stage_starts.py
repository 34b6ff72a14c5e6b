"""The denoising stages' starts without host syncs (sdxl_core/stage_starts.py): diffusers' numbers, made without
asking the device, and the same images."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from sdxl_core.cross_kv import CrossKVCache
from sdxl_core.generate import GenerationRequest, GenerationSettings, generate
from sdxl_core.loading import load_pipelines
from sdxl_core.optimize import LEVELS, apply_level
from sdxl_core.stage_starts import (is_sync_free, stopping_after, sync_free_stage_start, timesteps_on_host,
                                    zero_text_rows)

# lean_host without what needs CUDA or compiles; float32, so that nothing but the stage starts differs
LEVEL = replace(LEVELS["lean_host"], compile_mode=None, compile_text_encoders=False, dtype="float32",
                fp8_geglu=False, flash_cross_attention=False, cudnn=False)
SETTINGS = GenerationSettings(steps=10, width=64, height=64)


def _euler(tiny_pipes) -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler.from_config(tiny_pipes.base.scheduler.config)


@pytest.mark.parametrize("steps", [50, 10, 7])
def test_the_schedule_is_diffusers_own_and_its_cut_is_denoising_ends(tiny_pipes, steps):
    ours, theirs = _euler(tiny_pipes), _euler(tiny_pipes)
    assert timesteps_on_host(ours) and type(ours).__name__ == "EulerDiscreteScheduler"
    assert timesteps_on_host(ours)  # a second switch changes nothing
    ours.set_timesteps(steps, device="cpu")
    theirs.set_timesteps(steps, device="cpu")
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    assert torch.equal(ours.host_timesteps, theirs.timesteps) and ours.num_inference_steps == steps
    cutoff = int(round(1000 - 0.8 * 1000))  # diffusers' denoising_end=0.8 filter, as the base pipeline has it
    kept = len([t for t in theirs.timesteps if t >= cutoff])
    with stopping_after(ours, kept):
        ours.set_timesteps(steps, device="cpu")
    assert torch.equal(ours.timesteps, theirs.timesteps[:kept]) and torch.equal(ours.sigmas, theirs.sigmas)
    ours.set_timesteps(steps, device="cpu")  # the cut holds only inside the block
    assert len(ours.timesteps) == steps


def test_schedulers_it_does_not_cover_are_left_alone(tiny_pipes):
    ddim = DDIMScheduler.from_config(tiny_pipes.base.scheduler.config)
    assert not timesteps_on_host(ddim) and type(ddim) is DDIMScheduler
    continuous = EulerDiscreteScheduler.from_config(tiny_pipes.base.scheduler.config, timestep_type="continuous")
    assert not timesteps_on_host(continuous)
    with pytest.raises(TypeError, match="timesteps_on_host"):
        with stopping_after(ddim, 3):
            pass
    pipes = load_pipelines("tiny", "tiny", device="cpu")
    pipes.base.scheduler = ddim
    assert sync_free_stage_start(pipes.base).startswith("unchanged: DDIMScheduler")
    assert not is_sync_free(pipes.base)


def test_the_refiners_timesteps_and_the_micro_conditioning_are_diffusers_own():
    ours, theirs = load_pipelines("tiny", "tiny", device="cpu"), load_pipelines("tiny", "tiny", device="cpu")
    assert sync_free_stage_start(ours.refiner) == "sync-free" and is_sync_free(ours.refiner)
    assert type(ours.refiner).__name__ == type(theirs.refiner).__name__
    for start in (0.8, 0.5, 0.93):
        for pipe in (ours.refiner, theirs.refiner):
            pipe.scheduler.set_timesteps(50, device="cpu")
        got = ours.refiner.get_timesteps(50, 0.3, "cpu", denoising_start=start)
        want = theirs.refiner.get_timesteps(50, 0.3, "cpu", denoising_start=start)
        assert torch.equal(got[0], want[0]) and got[1] == want[1]
        assert ours.refiner.scheduler.begin_index == theirs.refiner.scheduler.begin_index
    args = ((64, 64), (0, 0), (64, 64), 6.0, 2.5, (64, 64), (0, 0), (64, 64))
    got = ours.refiner._get_add_time_ids(*args, dtype=torch.float32, text_encoder_projection_dim=32)
    want = theirs.refiner._get_add_time_ids(*args, dtype=torch.float32, text_encoder_projection_dim=32)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.fixture(scope="module")
def both():
    """The level with and without sync-free stage starts, each on its own pipelines."""
    out = {}
    for flag in (False, True):
        pipes = load_pipelines("tiny", "tiny", device="cpu")
        apply_level(pipes, replace(LEVEL, sync_free_stage_starts=flag))
        out[flag] = pipes
    return out


def test_the_level_switches_both_pipelines_and_keeps_their_pinned_device(both):
    pipes = both[True]
    assert pipes.sync_free_stage_starts and pipes.kernel_backends["stage_starts"] == ["sync-free", "sync-free"]
    from sdxl_core.host_work import is_pinned

    assert all(is_sync_free(p) and is_pinned(p) for p in (pipes.base, pipes.refiner))
    assert not both[False].sync_free_stage_starts and not is_sync_free(both[False].base)


@pytest.mark.parametrize("negative,batch", [(None, 1), ("wrong", 1), (None, 2)])
def test_images_are_bit_identical_and_the_zero_rows_are_claimed_not_read(both, monkeypatch, negative, batch):
    reads = []
    read = CrossKVCache._set_zero_rows
    monkeypatch.setattr(CrossKVCache, "_set_zero_rows", lambda self, ehs: reads.append(1) or read(self, ehs))
    request = GenerationRequest("a wolf, (oil on canvas)+++", 3, negative, batch_size=batch, settings=SETTINGS)
    want = generate(both[False], request)
    assert len(reads) == 2  # the base's and the refiner's zero-row checks, each a host sync on a GPU
    got = generate(both[True], request)
    assert len(reads) == 2
    assert torch.equal(got.latents, want.latents)
    assert [i.tobytes() for i in got.images] == [i.tobytes() for i in want.images]
    base = both[True].base.unet
    assert base.zero_rows == (() if negative else tuple(range(batch))) == both[False].base.unet.zero_rows
    assert base._claim is None and base._unverified == []  # used, checked and read after the image


def test_a_claim_is_checked_on_the_device_and_a_false_one_raises(both):
    cache = both[True].base.unet
    text = torch.zeros(2, 77, cache.config.cross_attention_dim)
    text[1] = 0.5
    cache.claim_zero_rows((0,))
    cache.packed(text)
    assert cache.zero_rows == (0,)
    cache.verify_claims()  # right
    cache.claim_zero_rows((0, 1))
    cache.packed(text.clone())
    assert cache.zero_rows == (0, 1)
    with pytest.raises(RuntimeError, match=r"rows \(0, 1\) were claimed all zeros"):
        cache.verify_claims()
    cache.claim_zero_rows(())  # claiming none is always safe: nothing to check
    cache.packed(text.clone())
    assert cache.zero_rows == () and cache._unverified == []
    cache.claim_zero_rows(None)


def test_zero_text_rows_follow_diffusers_rules(both):
    base, refiner = both[True].base, both[True].refiner
    assert zero_text_rows(base, 2, negative_given=False, guidance_scale=13.0) == (0, 1)
    assert zero_text_rows(base, 2, negative_given=True, guidance_scale=13.0) == ()
    assert zero_text_rows(base, 2, negative_given=False, guidance_scale=1.0) == ()  # no guidance, no uncond half
    assert zero_text_rows(refiner, 2, negative_given=False, guidance_scale=13.0) == ()  # it encodes ""


def test_a_scheduler_swapped_in_after_the_level_takes_diffusers_own_path():
    pipes = load_pipelines("tiny", "tiny", device="cpu")
    apply_level(pipes, LEVEL)
    request = GenerationRequest("a wolf", 3, settings=SETTINGS)
    want = generate(pipes, request).latents
    pipes.base.scheduler = EulerDiscreteScheduler.from_config(pipes.base.scheduler.config)  # a user's swap
    assert pipes.sync_free_stage_starts and not is_sync_free(pipes.base)
    assert torch.equal(generate(pipes, request).latents, want)  # denoising_end again, the same latents
