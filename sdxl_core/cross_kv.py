"""Cross-attention keys and values computed once per image instead of once per denoising step.

Every SDXL transformer block projects the text embeddings to keys and values for its cross-attention
(``attn2.to_k``/``to_v``, or the fused ``to_kv``). The text embeddings are the same at every step of an image,
so these projections give the same result 40 times (base) and 10 times (refiner). :class:`CrossKVCache` wraps a
UNet: when the text embeddings it is called with change, it runs all cross-attention key/value projections once,
packs them end to end into one flat tensor (layer by layer, each ``[batch, tokens, 2 x inner_dim]`` block
contiguous) and hands that to the UNet through ``cross_attention_kwargs``; the attention processors it installs
view their own block, so keys and values have the same strides as the fused ``to_kv`` output they replace (a
feature-axis packing gave them a row stride of the whole pack, and inductor then copied them before attention:
slower than recomputing, on the CPU). One packed tensor keeps a compiled UNet's inputs to one extra tensor (CUDA
graphs copy each non-static input at every replay).

The arithmetic is the same projection on the same inputs, so the UNet output is unchanged (bit-identical in
eager mode; ``tests/test_cross_kv.py``).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from sdxl_core.errors import InvalidConfigError

KWARG = "cross_kv"


def _check_layer(name: str, attn: nn.Module) -> None:
    """The cached path covers SDXL's cross-attention; anything else is refused with the reason."""
    unsupported = [flag for flag, on in (("norm_cross", attn.norm_cross is not None),
                                         ("spatial_norm", attn.spatial_norm is not None),
                                         ("group_norm", attn.group_norm is not None),
                                         ("norm_k", getattr(attn, "norm_k", None) is not None),
                                         ("residual_connection", attn.residual_connection)) if on]
    if unsupported:
        raise InvalidConfigError(f"cross-attention {name} uses {', '.join(unsupported)}, which the cross K/V cache "
                                 f"does not reproduce; use a level without cache_cross_kv for this model")


def _kv_width(attn: nn.Module) -> int:
    """Features of keys and values together, as :func:`_project_kv` returns them."""
    if getattr(attn, "fused_projections", False):
        return attn.to_kv.out_features
    return attn.to_k.out_features + attn.to_v.out_features


def _kv_modules(attn: nn.Module) -> tuple[nn.Module, ...]:
    """The modules that project the text to keys and values: the fused ``to_kv``, or ``to_k`` and ``to_v``."""
    return (attn.to_kv,) if getattr(attn, "fused_projections", False) else (attn.to_k, attn.to_v)


def _project_kv(attn: nn.Module, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """Keys and values side by side on the last axis, as the fused ``to_kv`` lays them out."""
    parts = [module(encoder_hidden_states) for module in _kv_modules(attn)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _lora_projections(layers: list[nn.Module]) -> list[nn.Module]:
    """The key/value projections of ``layers`` that PEFT has made LoRA layers (it puts its layer in the
    projection's place), looked up at each call: a LoRA loaded after :func:`install` replaces the modules."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for attn in layers for module in _kv_modules(attn) if isinstance(module, BaseTunerLayer)]


class _SelfAttention:
    """The layer's own processor, with a ``cross_kv`` argument so that diffusers passes the packed tensor along
    without a warning (self-attention does not use it)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 cross_kv: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def _row_runs(batch: int, skip: tuple[int, ...]) -> list[tuple[int, int, bool]]:
    """Batch rows ``0..batch-1`` as maximal runs ``(start, stop, compute)``: ``compute`` is False for rows in
    ``skip``. Contiguous runs keep the row selections plain slices (views)."""
    runs: list[tuple[int, int, bool]] = []
    for i in range(batch):
        compute = i not in skip
        if runs and runs[-1][2] == compute and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1, compute)
        else:
            runs.append((i, i + 1, compute))
    return runs


def _bias_free(module: nn.Module, allow: nn.Module | None = None) -> bool:
    """Every ``nn.Linear`` in ``module`` (``allow`` excepted) has no bias, and there is at least one; other layer
    types (e.g. an fp8 linear) are not vouched for."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    others = [m for m in linears if m is not allow]
    if not linears or any(type(m) is not nn.Linear for m in others):
        return False
    return all(m.bias is None for m in others)


def _to_out_base(attn: nn.Module) -> nn.Module:
    """The layer under ``attn.to_out[0]``: its PEFT base layer when wrapped, else itself."""
    layer = attn.to_out[0]
    return getattr(layer, "base_layer", layer)


def _to_out_maps_zeros_to_bias(attn: nn.Module) -> bool:
    """Whether ``attn.to_out`` is known to make its base layer's bias (zeros without one) of zeros.

    A plain ``nn.Linear`` does; a PEFT LoRA wrapper does when its adapters have no bias (a LoRA maps zeros to
    zeros); anything else is not vouched for."""
    layer = attn.to_out[0]
    base = _to_out_base(attn)
    return type(base) is nn.Linear and (layer is base or _bias_free(layer, allow=base))


def zero_text_skippable(attn: nn.Module) -> bool:
    """True when text embeddings of zeros give this cross-attention layer the output ``to_out(0)`` whatever the
    query: bias-free key and value projections make keys and values zero, so attention averages zero values."""
    if getattr(attn, "fused_projections", False):
        kv_free = _bias_free(attn.to_kv)
    else:
        kv_free = _bias_free(attn.to_k) and _bias_free(attn.to_v)
    return kv_free and _to_out_maps_zeros_to_bias(attn)


def flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Softmax attention (no mask, no dropout, the default scale) through PyTorch's FlashAttention kernel itself:
    FlashAttention-2 on CUDA, its flash kernel on the CPU. SDPA picks cuDNN's kernel on Hopper (run 3), which a
    CUDA graph precedes with a memset at every call (run 6: 6,556 per image, each with ~3 us of idle after it);
    for the cross-attention's 77 keys the product itself is small, so the kernel choice is mostly that overhead.
    Inputs are (batch, heads, tokens, head_dim) with the last dimension contiguous; on CUDA fp16 or bf16."""
    if query.device.type == "cuda":
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, False, False)[0]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False)[0]


class _CachedCrossAttention:
    """SDPA cross-attention whose keys and values are the packed tensor's block for this layer: it starts after
    ``offset`` features per token of the layers before it, and holds ``width`` features per token.

    Batch rows listed in ``zero_rows`` (set by the cache: their text embeddings are all zeros, as SDXL's
    unconditional half is without a negative prompt) are not attended: their output is ``to_out(0)``, exactly
    what attention over zero keys and values gives."""

    def __init__(self, inner: Any, offset: int, width: int):
        self.inner, self.offset, self.width = inner, offset, width
        self.zero_rows: tuple[int, ...] = ()
        self.flash = False  # attend through FlashAttention directly (see flash_attention), not SDPA's choice

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 cross_kv: torch.Tensor | None = None) -> torch.Tensor:
        if cross_kv is None or encoder_hidden_states is None or attention_mask is not None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch, tokens = encoder_hidden_states.shape[:2]
        start = batch * tokens * self.offset
        kv = cross_kv[start:start + batch * tokens * self.width].view(batch, tokens, self.width)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(b, channel, height * width).transpose(1, 2)
        if not self.zero_rows:
            out = self._attend(attn, hidden_states, kv)
        else:
            pieces = []
            for lo, hi, compute in _row_runs(batch, self.zero_rows):
                if compute:
                    pieces.append(self._attend(attn, hidden_states[lo:hi], kv[lo:hi]))
                else:
                    # install() checked that to_out maps zeros to its base bias; only look the bias up here
                    bias = _to_out_base(attn).bias
                    n_out = attn.to_out[0].out_features
                    fill = (bias.to(hidden_states.dtype) if bias is not None
                            else hidden_states.new_zeros(n_out))
                    pieces.append(fill.expand(hi - lo, hidden_states.shape[1], n_out))
            out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, channel, height, width)
        return out / attn.rescale_output_factor

    def _attend(self, attn: nn.Module, hidden_states: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        batch = hidden_states.shape[0]
        key, value = torch.split(kv, self.width // 2, dim=-1)
        query = attn.to_q(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if self.flash:
            out = flash_attention(query, key, value)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class CrossKVCache(nn.Module):
    """A UNet whose cross-attention keys and values are computed once per text embedding.

    Install with :func:`install`; it stands in for the UNet in its pipeline (attributes not its own, such as
    ``config`` and ``dtype``, come from the UNet). The cache is keyed on the ``encoder_hidden_states`` object
    itself (held weakly, with its version counter) and the LoRA scale, so a new prompt, an in-place change or a
    new scale recomputes it."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.layers: list[nn.Module] = []  # the cross-attention layers, in packing order
        self._key: tuple[Any, ...] | None = None
        self._packed: torch.Tensor | None = None
        self.projections_run = 0  # how many times the keys and values were computed (the tests read it)
        self.skip_zero_text = False  # set by install() when every layer allows it
        self.zero_rows: tuple[int, ...] = ()
        self._claim: tuple[int, ...] | None = None  # see claim_zero_rows
        self._unverified: list[tuple[tuple[int, ...], torch.Tensor]] = []

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("unet")
            if inner is None:  # not set up yet (e.g. while unpickling): nothing to forward to
                raise
            return getattr(inner, name)

    def packed(self, encoder_hidden_states: torch.Tensor, lora_scale: float = 1.0) -> torch.Tensor:
        """All cross-attention keys and values for ``encoder_hidden_states``, flat, one block per layer in order."""
        key = (encoder_hidden_states._version, float(lora_scale))
        if self._key is not None and self._key[0]() is encoder_hidden_states and self._key[1:] == key:
            return self._packed
        from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

        if self.skip_zero_text and self._claim is not None:  # no host sync: checked on the device, read later
            claim, self._claim = self._claim, None
            self._apply_zero_rows(claim)
            if claim:
                self._unverified.append((claim, encoder_hidden_states[list(claim)].eq(0).all()))
        elif self.skip_zero_text:  # its host sync first, so the projections below run while the host goes on
            self._set_zero_rows(encoder_hidden_states)
        # As the UNet's forward scales its PEFT LoRA layers around its own call, but only the LoRA layers these
        # projections run: two walks over the whole UNet's modules cost milliseconds at every stage start, on the
        # host, with the device idle (run 6: the gaps before the first projection and after the last one).
        scaled = _lora_projections(self.layers) if USE_PEFT_BACKEND and lora_scale != 1.0 else []
        for module in scaled:
            scale_lora_layers(module, lora_scale)
        try:
            parts = [_project_kv(attn, encoder_hidden_states).reshape(-1) for attn in self.layers]
        finally:
            for module in scaled:
                unscale_lora_layers(module, lora_scale)
        self._packed = torch.cat(parts)
        self._key = (weakref.ref(encoder_hidden_states), *key)
        self.projections_run += 1
        return self._packed

    def _set_zero_rows(self, encoder_hidden_states: torch.Tensor) -> None:
        """Find the batch rows whose text embeddings are all zeros (one host sync per new text) and tell the
        processors. An unchanged set keeps the same tuple object, so a compiled UNet's guards keep holding."""
        nonzero = (encoder_hidden_states.reshape(encoder_hidden_states.shape[0], -1) != 0).any(dim=1).tolist()
        self._apply_zero_rows(tuple(i for i, nz in enumerate(nonzero) if not nz))

    def _apply_zero_rows(self, rows: tuple[int, ...]) -> None:
        if rows == self.zero_rows:
            return
        self.zero_rows = rows
        for attn in self.layers:
            attn.processor.zero_rows = rows

    def claim_zero_rows(self, rows: tuple[int, ...] | None) -> None:
        """Say which batch rows of the next new text are all zeros, known from how the caller made it (SDXL's base
        zeroes the unconditional half when there is no negative prompt), so the cache need not ask the device (a
        host sync, with the device idle while the stage's host work that follows runs). Rows claimed zero are
        still checked, on the device; :meth:`verify_claims` reads the checks. Claiming a zero row as not zero is
        safe: attention over zero keys and values gives ``to_out(0)``, which a skipped row gets. ``None`` withdraws
        an unused claim."""
        self._claim = None if rows is None else tuple(sorted(rows))

    def verify_claims(self) -> None:
        """Raise if a row claimed zero since the last call was not (one host sync if there is anything to read):
        the images made since then attended wrongly."""
        checks, self._unverified = self._unverified, []
        wrong = [claim for claim, ok in checks if not bool(ok)]
        if wrong:
            raise RuntimeError(f"cross K/V cache: batch rows {wrong[0]} were claimed all zeros (claim_zero_rows) and "
                               f"were not; the images made since the claim skipped their cross-attention wrongly")

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, *args: Any,
                cross_attention_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        cak = dict(cross_attention_kwargs or {})
        cak[KWARG] = self.packed(encoder_hidden_states, cak.get("scale", 1.0))
        return self.unet(sample, timestep, encoder_hidden_states, *args, cross_attention_kwargs=cak, **kwargs)


def install(pipe: Any, skip_zero_text: bool = True) -> CrossKVCache:
    """Put a :class:`CrossKVCache` in place of ``pipe.unet`` (after its attention processors, fusion and compile
    are set) and give every attention layer of the UNet a processor that takes the packed tensor.

    The processors' layout is fixed here: change the UNet's projections afterwards (fuse or unfuse QKV) and the
    cache no longer matches, so install last. Load LoRAs before, too: a pipeline's LoRA loader would look for the
    UNet's layers under this stand-in's names.

    ``skip_zero_text``: batch rows whose text embeddings are all zeros skip cross-attention (their output is
    ``to_out(0)``), when every layer's key and value projections are bias-free; SDXL's base without a negative
    prompt feeds zeros to the unconditional half of every guided step."""
    unet = pipe.unet
    if isinstance(unet, CrossKVCache):
        raise InvalidConfigError("this pipeline's UNet already has a cross K/V cache")
    from diffusers.models.attention_processor import Attention

    cache = CrossKVCache(unet)
    offset = 0
    for name, attn in unet.named_modules():
        if not isinstance(attn, Attention):
            continue
        if not attn.is_cross_attention:
            attn.set_processor(_SelfAttention(attn.processor))
            continue
        _check_layer(name, attn)
        width = _kv_width(attn)
        cache.layers.append(attn)
        attn.set_processor(_CachedCrossAttention(attn.processor, offset, width))
        offset += width
    if not cache.layers:
        raise InvalidConfigError(f"{type(unet).__name__} has no cross-attention layers; the cross K/V cache has "
                                 f"nothing to do")
    cache.skip_zero_text = skip_zero_text and all(zero_text_skippable(attn) for attn in cache.layers)
    object.__setattr__(pipe, "unet", cache)  # not through the pipeline's config bookkeeping: a stand-in, not a part
    return cache
