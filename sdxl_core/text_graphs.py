"""compel's text encoder calls replayed from CUDA graphs.

With the text encoders compiled (inductor, default mode), the text stage of one image still launches its ~1,000
kernels one by one from inductor's Python wrapper and ATen (run 6 on an H100: 25.8 ms for 4.3 ms of kernels, the
device idle in between). CUDA graph trees (``mode="reduce-overhead"``) would overwrite an output that compel still
holds when it calls the same encoder again (the negative prompt after the prompt), so this module records its own
graphs, one per call signature, and hands out copies of their outputs.

:class:`GraphedTextEncoder` stands in for a text encoder where compel calls it. For each call signature (input
shapes, dtypes and device, whether an attention mask is given, whether hidden states are asked for) it calls the
encoder directly the first time; at the second call it records a CUDA graph (warm-up on a side stream, then
capture, as PyTorch's CUDA graph recipe has it); from then on it copies the inputs into the graph's static inputs,
replays it and returns copies of its outputs, in the encoder's own output type. A signature called only once
(compel's empty-prompt embeddings, made once per compel provider) is never recorded. Each recording is checked
once against a direct call; one that fails leaves its signature to the encoder and is reported in ``stats()``.

The graph holds the encoder's weights by address: they must stay where they are (no device or dtype moves, no
LoRA loaded into the text encoders afterwards), as ``torch.compile``'s CUDA graphs assume too. LoRA layers already
in a text encoder are refused, since their scale is a Python number the graph would freeze. Calls the graphs do
not cover (other keyword arguments, ``return_dict=False``, grad mode on, inputs on another device) go to the
encoder directly.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from sdxl_core.errors import InvalidConfigError

# capture(fn, static_args) -> (replay, outputs): record ``fn(*static_args)``; ``replay()`` reruns it on whatever the
# static inputs hold, writing into ``outputs``' memory.
Capture = Callable[[Callable[..., Any], tuple[torch.Tensor, ...]], tuple[Callable[[], None], Any]]


def capture_cuda_graph(fn: Callable[..., Any], args: tuple[torch.Tensor, ...], warmup: int = 3
                       ) -> tuple[Callable[[], None], Any]:
    """Record ``fn(*args)`` as a CUDA graph: ``warmup`` calls on a side stream (lazy initialisation, cuBLAS
    workspaces), then the capture. Returns ``(graph.replay, outputs)``; a host sync inside ``fn`` fails the
    capture with CUDA's own error."""
    device = args[0].device
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn(*args)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*args)
    return graph.replay, outputs


def _signature(tensor: torch.Tensor | None) -> tuple[Any, ...] | None:
    return None if tensor is None else (tuple(tensor.shape), tensor.dtype, tensor.device)


class GraphedTextEncoder:
    """A text encoder as compel calls it (``encoder(input_ids, attention_mask, output_hidden_states=...,
    return_dict=True)``), replayed from a CUDA graph per call signature from its second call on.

    A recording is checked once against a direct call on the same inputs; a capture that raises (a host sync in the
    call, say) or a replay that differs by more than ``tolerance`` (relative to the output's largest value) leaves
    that signature to the encoder, and says why in ``stats()["failures"]``, so a run shows it rather than timing a
    wrong graph. Every other attribute is the encoder's (compel reads ``device`` and ``dtype``). ``stats()`` also
    counts the calls made directly, the graphs recorded and the replays."""

    def __init__(self, encoder: torch.nn.Module, capture: Capture = capture_cuda_graph, tolerance: float = 1e-2):
        self.encoder = encoder
        self._device = encoder.device
        self._capture = capture
        self._tolerance = tolerance
        self._graphs: dict[tuple[Any, ...], tuple[tuple[torch.Tensor, ...], Callable[[], None], list[Any], Any]] = {}
        self._seen: Counter[tuple[Any, ...]] = Counter()
        self._failed: dict[tuple[Any, ...], str] = {}
        self._counts: Counter[str] = Counter()
        self._max_diff = 0.0

    def __getattr__(self, name: str) -> Any:  # only for names not set in __init__
        if name.startswith("_") or name == "encoder":
            raise AttributeError(name)
        return getattr(self.encoder, name)

    def stats(self) -> dict[str, Any]:
        return {"direct_calls": self._counts["direct"], "graphs": len(self._graphs), "replays": self._counts["replay"],
                "max_replay_diff": self._max_diff,
                "failures": [f"{_describe(key)}: {why}" for key, why in self._failed.items()]}

    def __call__(self, input_ids: Any, attention_mask: torch.Tensor | None = None, *,
                 output_hidden_states: bool | None = None, return_dict: bool = True, **kwargs: Any) -> Any:
        def direct() -> Any:
            self._counts["direct"] += 1
            return self.encoder(input_ids, attention_mask, output_hidden_states=output_hidden_states,
                                return_dict=return_dict, **kwargs)

        if kwargs or not return_dict or torch.is_grad_enabled() or not self._graphable(input_ids, attention_mask):
            return direct()
        key = (_signature(input_ids), _signature(attention_mask), output_hidden_states)
        if key not in self._graphs:
            self._seen[key] += 1
            if self._seen[key] < 2 or key in self._failed:
                return direct()
            try:  # the recording's checked replay ran on these very inputs: its outputs are this call's
                self._record(key, input_ids, attention_mask, output_hidden_states)
            except Exception as exc:  # kept in stats()["failures"], which the speed suite prints and saves
                self._failed[key] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                return direct()
        else:
            static, replay, _, _ = self._graphs[key]
            static[0].copy_(input_ids)
            if attention_mask is not None:
                static[1].copy_(attention_mask)
            replay()
        self._counts["replay"] += 1
        _, _, leaves, spec = self._graphs[key]
        return tree_unflatten([leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves], spec)

    def _graphable(self, input_ids: Any, attention_mask: Any) -> bool:
        return all(isinstance(t, torch.Tensor) and t.device == self._device
                   for t in (input_ids, attention_mask) if t is not None)

    def _record(self, key: tuple[Any, ...], input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                output_hidden_states: bool | None) -> None:
        static = (input_ids.clone(),) + (() if attention_mask is None else (attention_mask.clone(),))
        encoder = self.encoder

        def call(ids: torch.Tensor, mask: torch.Tensor | None = None) -> Any:
            return encoder(ids, mask, output_hidden_states=output_hidden_states, return_dict=True)

        with torch.no_grad():
            replay, outputs = self._capture(call, static)
            leaves, spec = tree_flatten(outputs)
            replay()
            want, want_spec = tree_flatten(call(*static))
        if want_spec != spec:
            raise RuntimeError(f"the replay's outputs are {spec}, the encoder's {want_spec}")
        diff = max((_relative_diff(got, ref) for got, ref in zip(leaves, want) if isinstance(ref, torch.Tensor)),
                   default=0.0)
        if not diff <= self._tolerance:
            raise RuntimeError(f"the replay differs from the encoder by {diff:.3g} of the output's largest value "
                               f"(tolerance {self._tolerance})")
        self._max_diff = max(self._max_diff, diff)
        self._graphs[key] = (static, replay, leaves, spec)


def _relative_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    if not ref.numel():
        return 0.0
    ref = ref.double()
    return (got.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)


def _describe(key: tuple[Any, ...]) -> str:
    ids, mask, hidden = key
    mask_text = "no mask" if mask is None else f"mask {list(mask[0])} {mask[1]}"
    return f"ids {list(ids[0])} {ids[1]}, {mask_text}, output_hidden_states={hidden}"


def install_output_capture_hooks(encoder: torch.nn.Module) -> None:
    """Have transformers install its hidden-state capturing hooks now, by one eager one-token call, so that a
    compiled call does not install them itself: the lock it takes to do so breaks the compiled graph in two."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=encoder.device)
    with torch.no_grad():
        encoder(ids, output_hidden_states=True, return_dict=True)


def graph_text_encoders(pipes: Any, capture: Capture = capture_cuda_graph) -> str:
    """Give ``pipes`` a :class:`GraphedTextEncoder` for each of the base's text encoders (the refiner shares
    ``text_encoder_2``), for :class:`sdxl_core.generate.PromptEncoder` to hand to compel. Returns what was done,
    for the results: CUDA graphs on a CUDA device, nothing elsewhere."""
    from sdxl_core.host_work import has_lora_layers

    device = pipes.device
    pipes.text_encoder_graphs = {}
    if device.type != "cuda" and capture is capture_cuda_graph:
        return f"not applicable on {device.type}"
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipes.base, name, None)
        if encoder is None:
            continue
        if has_lora_layers(encoder):
            raise InvalidConfigError(
                f"{name} carries LoRA layers, whose scale a CUDA graph would freeze; use a level without "
                f"text_encoder_graphs (e.g. lean) or load the LoRA into the UNet only")
        pipes.text_encoder_graphs[name] = GraphedTextEncoder(encoder, capture)
    return "cuda graphs"
