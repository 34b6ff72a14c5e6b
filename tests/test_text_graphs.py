"""compel's text encoder calls replayed from CUDA graphs (sdxl_core/text_graphs.py).

A CUDA graph needs a CUDA device; on the CPU these tests record with ``replay_by_rerun`` (graph_helpers.py), which
does what a replay does to memory (the function recomputed on the static inputs, into the recorded outputs'
tensors). That checks everything around the graph: when a signature is recorded, that inputs reach the static
buffers, that the outputs handed out are copies a later replay cannot change, and that compel's embeddings and the
images are bit-identical. The graph itself is checked on a CUDA device (the last test), and the claim that the
recorded call has no host sync (which would fail a capture) by compiling it with ``fullgraph=True``.
"""

from __future__ import annotations

import copy
import types
from dataclasses import replace

import pytest
import torch
from torch.utils._pytree import tree_flatten

from graph_helpers import replay_by_rerun
from sdxl_core.errors import InvalidConfigError
from sdxl_core.generate import GenerationRequest, PromptEncoder, generate
from sdxl_core.text_graphs import (GraphedTextEncoder, capture_cuda_graph, graph_text_encoders,
                                   install_output_capture_hooks)

PROMPT = "a majestic wolf in a misty forest at dawn, (oil on canvas)+++, highly detailed"


def _ids(seed: int, length: int = 77) -> torch.Tensor:
    return torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(seed))


def _counts(graphed: GraphedTextEncoder) -> dict[str, int]:
    stats = graphed.stats()
    assert stats["failures"] == [] and stats["max_replay_diff"] == 0.0  # the CPU recorder replays exactly
    return {k: stats[k] for k in ("direct_calls", "graphs", "replays")}


def _assert_same_output(a, b):
    assert type(a) is type(b) and list(a.keys()) == list(b.keys())
    left, _ = tree_flatten(a)
    right, _ = tree_flatten(b)
    assert len(left) == len(right) and all(torch.equal(x, y) for x, y in zip(left, right))


def test_a_signature_is_recorded_at_its_second_call_and_replays_its_inputs(tiny_pipes):
    encoder = tiny_pipes.base.text_encoder_2
    graphed = GraphedTextEncoder(encoder, replay_by_rerun)
    mask = torch.ones(1, 77, dtype=torch.long)
    with torch.no_grad():
        first = graphed(_ids(0), mask, output_hidden_states=True, return_dict=True)
        assert _counts(graphed) == {"direct_calls": 1, "graphs": 0, "replays": 0}
        held = graphed(_ids(1), mask, output_hidden_states=True, return_dict=True)  # recorded, checked, replayed
        assert _counts(graphed) == {"direct_calls": 1, "graphs": 1, "replays": 1}
        later = graphed(_ids(2), mask, output_hidden_states=True, return_dict=True)
        pooled = [graphed(_ids(3 + i), return_dict=True) for i in range(3)]  # another signature: no mask
        assert _counts(graphed) == {"direct_calls": 2, "graphs": 2, "replays": 4}
        for seed, out in ((0, first), (1, held), (2, later)):  # the replay after `held` did not change it
            _assert_same_output(out, encoder(_ids(seed), mask, output_hidden_states=True, return_dict=True))
        for i, out in enumerate(pooled):
            _assert_same_output(out, encoder(_ids(3 + i), return_dict=True))
    assert len(held.hidden_states) == encoder.config.num_hidden_layers + 1
    assert not torch.equal(held.text_embeds, later.text_embeds)


def test_calls_the_graphs_do_not_cover_go_to_the_encoder(tiny_pipes):
    encoder = tiny_pipes.base.text_encoder
    graphed = GraphedTextEncoder(encoder, replay_by_rerun)
    ids = _ids(0)
    with torch.no_grad():
        for _ in range(3):
            assert isinstance(graphed(ids, return_dict=False), tuple)
            graphed(ids, output_attentions=True)
            graphed(ids, None, return_dict=True)  # the one graphed call: direct, then recorded, then replayed
    for _ in range(2):
        graphed(ids)  # grad mode on: a graph would hand out outputs without their autograd history
    assert _counts(graphed) == {"direct_calls": 2 * 3 + 1 + 2, "graphs": 1, "replays": 2}
    assert graphed.device == encoder.device and graphed.dtype == encoder.dtype and graphed.config is encoder.config


def _failing_capture(fn, args):
    raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")


def _wrong_capture(fn, args):
    replay, outputs = replay_by_rerun(fn, args)

    def wrong_replay():
        replay()
        tree_flatten(outputs)[0][0].add_(1.0)

    return wrong_replay, outputs


@pytest.mark.parametrize("capture, why", [
    (_failing_capture, r"RuntimeError: CUDA error: operation not permitted when stream is capturing$"),
    (_wrong_capture, r"RuntimeError: the replay differs from the encoder by [0-9.e-]+ of the output's largest value"),
], ids=["capture-raises", "replay-differs"])
def test_a_signature_whose_recording_fails_goes_to_the_encoder_and_says_why(tiny_pipes, capture, why):
    encoder = tiny_pipes.base.text_encoder
    graphed = GraphedTextEncoder(encoder, capture)
    with torch.no_grad():
        outs = [graphed(_ids(i), return_dict=True) for i in range(4)]
        for i, out in enumerate(outs):
            _assert_same_output(out, encoder(_ids(i), return_dict=True))
    stats = graphed.stats()
    assert (stats["direct_calls"], stats["graphs"], stats["replays"]) == (4, 0, 0)
    assert len(stats["failures"]) == 1  # tried once, not at every call
    assert stats["failures"][0].startswith("ids [1, 77] torch.int64, no mask, output_hidden_states=None: ")
    import re

    assert re.search(why, stats["failures"][0]), stats["failures"][0]


def test_compel_embeddings_and_images_are_bit_identical(tiny_pipes, fast_settings):
    graphs = {name: GraphedTextEncoder(getattr(tiny_pipes.base, name), replay_by_rerun)
              for name in ("text_encoder", "text_encoder_2")}
    graphed_pipes = replace(tiny_pipes, text_encoder_graphs=graphs)
    plain, graphed = PromptEncoder(tiny_pipes), PromptEncoder(graphed_pipes)
    assert graphed.base.conditioning_provider.embedding_providers[1].text_encoder is graphs["text_encoder_2"]
    assert graphed.refiner.conditioning_provider.text_encoder is graphs["text_encoder_2"]  # the shared encoder
    for prompt, negative in ((PROMPT, "wrong"), (PROMPT, "wrong"), ("a red fox", "(blurry)1.3, wrong"), (PROMPT, None)):
        for name in ("base", "refiner"):
            want = PromptEncoder.embed(getattr(plain, name), [prompt], None if negative is None else [negative])
            got = PromptEncoder.embed(getattr(graphed, name), [prompt], None if negative is None else [negative])
            assert want.keys() == got.keys()
            for key, value in want.items():
                assert (value is None and got[key] is None) or torch.equal(value, got[key]), (prompt, name, key)
    stats = {name: _counts(g) for name, g in graphs.items()}
    # weighted prompts, pooled prompts, and (text_encoder_2 only) the empty prompt's int32 ids, which the base's and
    # the refiner's compel each encode once
    assert stats["text_encoder"]["graphs"] == 1 and stats["text_encoder_2"]["graphs"] == 3
    # 7 prompts through the base's compel and the refiner's, each its first call direct
    assert stats == {"text_encoder": {"direct_calls": 2, "graphs": 1, "replays": 7 - 1},
                     "text_encoder_2": {"direct_calls": 3, "graphs": 3, "replays": 2 * (14 - 1) + 1}}
    request = GenerationRequest(PROMPT, 5, "wrong", settings=fast_settings)
    assert generate(graphed_pipes, request, graphed).images[0].tobytes() == \
        generate(tiny_pipes, request, plain).images[0].tobytes()


def test_the_recorded_call_compiles_as_one_graph_once_the_capture_hooks_are_installed(tiny_pipes):
    """No graph break means no host sync in the recorded call (a sync would fail a CUDA graph capture). Without the
    hooks installed beforehand, the compiled call installs them itself, under a lock dynamo cannot trace."""
    fresh = type(tiny_pipes.base.text_encoder_2)(tiny_pipes.base.text_encoder_2.config).eval()
    ids, mask = _ids(0), torch.ones(1, 77, dtype=torch.long)

    def call(ids, mask):
        return fresh(ids, mask, output_hidden_states=True, return_dict=True)

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            with pytest.raises(Exception, match="context manager"):
                torch.compile(call, fullgraph=True, dynamic=False)(ids, mask)
            install_output_capture_hooks(fresh)
            torch._dynamo.reset()
            out = torch.compile(call, fullgraph=True, dynamic=False)(ids, mask)
            want = call(ids, mask)
    finally:
        torch._dynamo.reset()
    assert type(out) is type(want) and len(out.hidden_states) == len(want.hidden_states)
    for got, ref in zip(tree_flatten(out)[0], tree_flatten(want)[0], strict=True):  # inductor's fusions round apart
        assert (got - ref).abs().max().item() < 1e-4


def test_graph_text_encoders_is_cuda_only_and_refuses_lora_layers(tiny_pipes):
    pipes = replace(tiny_pipes, text_encoder_graphs={})
    assert graph_text_encoders(pipes) == "not applicable on cpu" and pipes.text_encoder_graphs == {}
    assert graph_text_encoders(pipes, replay_by_rerun) == "cuda graphs"
    assert {n: g.encoder for n, g in pipes.text_encoder_graphs.items()} == {
        "text_encoder": tiny_pipes.base.text_encoder, "text_encoder_2": tiny_pipes.base.text_encoder_2}
    assert pipes.text_encoder_for_compel(pipes.refiner, "text_encoder_2") is pipes.text_encoder_graphs["text_encoder_2"]
    assert tiny_pipes.text_encoder_for_compel(tiny_pipes.base, "text_encoder") is tiny_pipes.base.text_encoder

    from peft import LoraConfig, inject_adapter_in_model

    with_lora = inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]),
                                        copy.deepcopy(tiny_pipes.base.text_encoder))
    stand_in = types.SimpleNamespace(device=torch.device("cpu"), text_encoder_graphs={},
                                     base=types.SimpleNamespace(text_encoder=with_lora, text_encoder_2=None))
    with pytest.raises(InvalidConfigError, match="text_encoder carries LoRA layers.*level without text_encoder_graphs"):
        graph_text_encoders(stand_in, replay_by_rerun)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="records a real CUDA graph")
def test_cuda_graph_replays_match_the_encoder():
    from sdxl_core.loading import load_pipelines

    pipes = load_pipelines("tiny", "tiny", device="cuda", dtype="float32")
    encoder = pipes.base.text_encoder_2
    install_output_capture_hooks(encoder)
    graphed = GraphedTextEncoder(encoder, capture_cuda_graph)
    mask = torch.ones(1, 77, dtype=torch.long, device="cuda")
    with torch.no_grad():
        outs = [graphed(_ids(i).cuda(), mask, output_hidden_states=True, return_dict=True) for i in range(4)]
        for i, out in enumerate(outs):
            _assert_same_output(out, encoder(_ids(i).cuda(), mask, output_hidden_states=True, return_dict=True))
    stats = graphed.stats()
    assert stats["failures"] == [] and stats["max_replay_diff"] <= 1e-6, stats
    counts = {k: stats[k] for k in ("direct_calls", "graphs", "replays")}
    assert counts == {"direct_calls": 1, "graphs": 1, "replays": 3}
