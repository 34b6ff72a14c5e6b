"""Optimisation levels for base + refiner generation, each a frozen, named recipe applied to loaded pipelines.

The levels are cumulative, from ``eager`` (fp16, classic attention, fp32 VAE upcast: the reference code with
diffusers' pre-PyTorch-2 attention) to ``max`` (everything, with ``torch.compile`` and CUDA graphs), then
``fp8`` (``max`` with fp8 GEGLU projections, which changes the arithmetic and so is kept apart from ``max``) and
``cross_kv`` (``fp8`` with the cross-attention keys and values computed once per image) and ``host`` (``cross_kv``
with less host work per image: see ``sdxl_core/host_work.py``) and ``lean`` (``host`` with other attention kernels
where SDPA's choice costs more than the product: the cross-attention and the VAE decoder's attention) and
``lean_host`` (``lean`` with compel's text encoder calls replayed from CUDA graphs, ``sdxl_core/text_graphs.py``,
and fewer dynamo guards).
Each is checked against ``eager`` on the same seed by the speed suite.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from sdxl_core.errors import InvalidConfigError
from sdxl_core.loading import DTYPES, Pipelines
from sdxl_core.prompt_check import set_packrat_parsing

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


@dataclass(frozen=True)
class OptimizationLevel:
    """One recipe. ``vae_upcast`` is the stock SDXL VAE's fp32 upcast in fp16; turning it off decodes in the
    pipeline dtype, which the fp16-fix VAE makes safe in fp16 (and bf16's range makes safe anyway)."""

    name: str
    description: str
    dtype: str = "float16"
    sdpa: bool = False
    channels_last: bool = False
    fused_qkv: bool = False
    vae_upcast: bool = True
    compile_mode: str | None = None
    fuse_lora: bool = False
    compile_text_encoders: bool = False
    share_text_embeddings: bool = False
    cudnn: bool = False
    fp8_geglu: bool = False
    packrat_parser: bool = False
    cache_cross_kv: bool = False
    images_on_device: bool = False
    pin_execution_device: bool = False
    cache_empty_negative: bool = False
    fast_prompt_parse: bool = False
    flash_cross_attention: bool = False
    vae_classic_attention: bool = False
    subpixel_upsample: bool = False
    text_encoder_graphs: bool = False
    skip_builtin_module_guards: bool = False
    sync_free_compel: bool = False
    sync_free_stage_starts: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidConfigError(f"level {self.name}: unknown dtype {self.dtype!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise InvalidConfigError(f"level {self.name}: compile_mode must be one of {COMPILE_MODES}")
        if self.fused_qkv and not self.sdpa:
            raise InvalidConfigError(f"level {self.name}: fused QKV projections use SDPA; set sdpa=True")
        if self.cache_cross_kv and not self.sdpa:
            raise InvalidConfigError(f"level {self.name}: the cross K/V cache attends with SDPA; set sdpa=True")
        if self.flash_cross_attention and not self.cache_cross_kv:
            raise InvalidConfigError(f"level {self.name}: FlashAttention for cross-attention is a switch of the "
                                     f"cross K/V cache's processors; set cache_cross_kv=True")
        if self.flash_cross_attention and self.dtype == "float32":
            raise InvalidConfigError(f"level {self.name}: FlashAttention on CUDA takes fp16 or bf16; set "
                                     f"dtype='bfloat16' or flash_cross_attention=False")
        if self.fp8_geglu and self.dtype != "bfloat16":
            raise InvalidConfigError(f"level {self.name}: fp8 GEGLU projections write bf16 outputs (row-wise scaled "
                                     f"fp8 GEMMs have no fp16 output); set dtype='bfloat16'")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def cuda_graphs(self) -> bool:
        """Whether torch.compile records CUDA graphs for this level (they are recorded at a compiled function's
        second call, so a module called once per image records its graph during the second generation)."""
        return self.compile_mode in ("reduce-overhead", "max-autotune")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _levels() -> tuple[OptimizationLevel, ...]:
    eager = OptimizationLevel("eager", "fp16, classic attention (AttnProcessor), fp32 VAE upcast, LoRA unfused")
    sdpa = replace(eager, name="sdpa", description="+ PyTorch SDPA attention (diffusers' default on torch 2)",
                   sdpa=True)
    # Only fp16 upcasts the VAE (diffusers decodes bf16 as is), so this step belongs before bf16.
    vae = replace(sdpa, name="vae_no_upcast",
                  description="+ VAE decodes in fp16 (what the fp16-fix VAE allows) instead of an fp32 upcast",
                  vae_upcast=False)
    bf16 = replace(vae, name="bf16", description="+ bfloat16 weights and activations", dtype="bfloat16")
    cl = replace(bf16, name="channels_last", description="+ channels_last memory format for UNets and VAE",
                 channels_last=True)
    fused = replace(cl, name="fused_qkv", description="+ fused QKV projections (UNets and VAE)", fused_qkv=True)
    cudnn = replace(fused, name="cudnn",
                    description="+ cuDNN attention first in SDPA's backend order (FlashAttention-2 if a probe "
                                "fails) and cuDNN convolution autotuning (torch.backends.cudnn.benchmark)",
                    cudnn=True)
    comp = replace(cudnn, name="compile",
                   description="+ torch.compile(fullgraph) of both UNets and the VAE decoder, inductor default mode",
                   compile_mode="default")
    graphs = replace(comp, name="cudagraphs", description="+ CUDA graphs (torch.compile mode reduce-overhead)",
                     compile_mode="reduce-overhead")
    best = replace(graphs, name="max",
                   description="+ text encoders compiled, the refiner reuses the base's text_encoder_2 "
                               "embeddings (bit-identical) instead of encoding the prompt again, and compel's "
                               "prompt parser memoises (pyparsing packrat: the same parse, about 1.8x faster)",
                   compile_text_encoders=True, share_text_embeddings=True, packrat_parser=True)
    fp8 = replace(best, name="fp8",
                  description="+ fp8 (e4m3, row-wise scaled) GEGLU input projections in both UNets "
                              "(torch._scaled_mm; CUDA compute capability 8.9+)",
                  fp8_geglu=True)
    kv = replace(fp8, name="cross_kv",
                 description="+ cross-attention keys and values computed once per image (they depend only on the "
                             "text) instead of at every denoising step, and no cross-attention for batch rows whose "
                             "text embeddings are zeros (the base's unconditional half without a negative prompt: "
                             "the output is to_out's bias) (sdxl_core/cross_kv.py)",
                 cache_cross_kv=True)
    host = replace(kv, name="host",
                   description="+ less host work per image, where the device waits for it: the final image converted "
                               "to 8 bits on the device by diffusers' arithmetic (the same pixels), so 3 MB of uint8 "
                               "cross to the host instead of a float image converted on the CPU; the pipelines' "
                               "execution device looked up once instead of by a walk over every module at each call; "
                               "the refiner's embeddings of the empty negative prompt made once instead of for every "
                               "image (sdxl_core/host_work.py); compel's parse of plain words and weighted groups by "
                               "a direct scan, its grammar for anything else (the same parse, "
                               "sdxl_core/prompt_parse.py)",
                   images_on_device=True, pin_execution_device=True, cache_empty_negative=True,
                   fast_prompt_parse=True)
    lean = replace(host, name="lean",
                   description="+ cross-attention through FlashAttention-2 instead of SDPA's cuDNN kernel, which a "
                               "CUDA graph precedes with a memset at every call (over 77 keys the product is small, so "
                               "the overhead is most of the cost), and the VAE decoder's one attention (16,384 "
                               "tokens, head dim 512, which no flash kernel takes) as diffusers' classic matmul-"
                               "softmax-matmul instead of the memory-efficient kernel (4.6 ms in run 6), and every "
                               "upsampler (nearest 2x, then a 3x3 convolution) as one 2x2 convolution at the input's "
                               "resolution and a pixel shuffle: the same function in 4/9 of the multiply-adds "
                               "(sdxl_core/subpixel.py)",
                   flash_cross_attention=True, vae_classic_attention=True, subpixel_upsample=True)
    lean_host = replace(lean, name="lean_host",
                        description="+ compel's text encoder calls replayed from CUDA graphs, one per call "
                                    "signature, recorded at its second call, their outputs copied out for compel "
                                    "to keep, instead of ~1,000 kernels launched one by one from inductor's wrapper "
                                    "per image (sdxl_core/text_graphs.py), and no dynamo guards on PyTorch's built-in "
                                    "modules (torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe: the base UNet's "
                                    "call checks ~16k guards instead of ~38k, which is host time with the device idle "
                                    "at each stage's first step), and compel's embeddings by its own arithmetic with "
                                    "its host numbers kept on the host: token ids, weights and masks copied to the "
                                    "device from pinned memory without waiting, its decisions read from the host's "
                                    "copies, instead of 13 host syncs per image (the same embeddings, "
                                    "sdxl_core/compel_uploads.py), and the denoising stages started without host "
                                    "syncs (61 per image), so that a stage's host work overlaps the device's work "
                                    "before it: the schedule computed on the CPU and its timesteps copied without "
                                    "waiting, the base's denoising_end cut made on the CPU, the micro-conditioning "
                                    "copied from pinned memory, the zero text rows of the cross K/V cache claimed "
                                    "by the caller and checked on the device (the same images, "
                                    "sdxl_core/stage_starts.py)",
                        text_encoder_graphs=True, skip_builtin_module_guards=True, sync_free_compel=True,
                        sync_free_stage_starts=True)
    return (eager, sdpa, vae, bf16, cl, fused, cudnn, comp, graphs, best, fp8, kv, host, lean, lean_host)


LEVELS: dict[str, OptimizationLevel] = {level.name: level for level in _levels()}


def get_level(name: str) -> OptimizationLevel:
    try:
        return LEVELS[name]
    except KeyError:
        raise InvalidConfigError(f"unknown optimisation level {name!r}; choose from {', '.join(LEVELS)}") from None


def _modules(pipes: Pipelines) -> dict[str, Any]:
    mods = {"unet": pipes.base.unet, "vae": pipes.base.vae, "text_encoder": pipes.base.text_encoder,
            "text_encoder_2": pipes.base.text_encoder_2}
    if pipes.refiner is not None:
        mods["unet_refiner"] = pipes.refiner.unet
    return mods


def configure_inductor() -> None:
    """Inductor settings that pay for UNets (from PyTorch's "Diffusion, Fast" recipe): 1x1 convs as matmuls."""
    import torch._inductor.config as inductor_config

    inductor_config.conv_1x1_as_mm = True
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


_DEFAULT_SDP_PRIORITY: list[int] | None = None

# Attention shapes of SDXL at 1024x1024 with guidance (batch 2): self-attention at 64x64 and 32x32 latents
# (10 and 20 heads of 64) and cross-attention on 77 text tokens.
_PROBE_SHAPES = (((2, 10, 4096, 64), (2, 10, 4096, 64)), ((2, 20, 1024, 64), (2, 20, 1024, 64)),
                 ((2, 10, 4096, 64), (2, 10, 77, 64)))


def _sdpa_backends() -> Any:
    from torch.nn.attention import SDPBackend

    return SDPBackend


def probe_cudnn_attention(device: torch.device, dtype: torch.dtype, tol: float = 2e-2) -> str | None:
    """Run cuDNN SDPA alone on SDXL's attention shapes and compare with the math backend in fp32.

    Returns ``None`` when cuDNN attention works, else why not (the caller falls back to FlashAttention-2)."""
    from torch.nn.attention import sdpa_kernel

    b = _sdpa_backends()
    gen = torch.Generator(device=device).manual_seed(0)
    for q_shape, kv_shape in _PROBE_SHAPES:
        q = torch.randn(q_shape, device=device, dtype=dtype, generator=gen)
        k = torch.randn(kv_shape, device=device, dtype=dtype, generator=gen)
        v = torch.randn(kv_shape, device=device, dtype=dtype, generator=gen)
        try:
            with sdpa_kernel(b.CUDNN_ATTENTION):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel(b.MATH):
                ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        except RuntimeError as exc:
            return f"cuDNN attention unavailable for q{q_shape} kv{kv_shape}: {exc}".splitlines()[0][:300]
        err = (out.float() - ref).abs().max().item()
        if not err <= tol:
            return f"cuDNN attention differs from math by {err:.3g} (> {tol}) for q{q_shape} kv{kv_shape}"
    return None


def set_kernel_backends(level: OptimizationLevel, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Set the process-wide switches of ``level`` (SDPA backend priority, cuDNN conv autotuning, packrat parsing).

    They are global in PyTorch, so every level sets all of them, and the previous case's choices never
    carry over. ``torch.compile`` bakes the SDPA choice into its graph at the first call, so this runs
    before compiling. Returns what was chosen, for the results."""
    global _DEFAULT_SDP_PRIORITY
    from torch.nn.attention import _sdpa_kernel

    b = _sdpa_backends()
    if _DEFAULT_SDP_PRIORITY is None:
        _DEFAULT_SDP_PRIORITY = list(torch._C._get_sdp_priority_order())
    default = [b(i) for i in _DEFAULT_SDP_PRIORITY]
    chosen: dict[str, Any] = {"cudnn_benchmark": bool(level.cudnn and device.type == "cuda")}
    torch.backends.cudnn.benchmark = chosen["cudnn_benchmark"]
    order = default
    if level.cudnn and device.type == "cuda":
        failure = probe_cudnn_attention(device, dtype)
        if failure is None:
            order = [b.CUDNN_ATTENTION] + [x for x in default if x != b.CUDNN_ATTENTION]
        else:
            chosen["cudnn_attention_probe"] = failure
    elif level.cudnn:
        chosen["cudnn_attention_probe"] = f"not applicable on {device.type}"
    _sdpa_kernel(order, set_priority=True)
    chosen["sdpa_priority"] = [x.name for x in order]
    set_packrat_parsing(level.packrat_parser)
    chosen["prompt_parser_packrat"] = level.packrat_parser
    if level.sdpa and device.type == "cuda":
        q = torch.zeros(_PROBE_SHAPES[0][0], device=device, dtype=dtype)
        chosen["sdpa_backend_self_attention"] = b(torch._fused_sdp_choice(q, q, q)).name
    return chosen


def _check_flash_head_dim(attn: Any, device: torch.device) -> None:
    """FlashAttention-2 on CUDA takes head dims that are multiples of 8 up to 256 (SDXL's are 64)."""
    head_dim = attn.processor.width // 2 // attn.heads
    if device.type == "cuda" and (head_dim % 8 or head_dim > 256):
        raise InvalidConfigError(f"cross-attention head dim {head_dim}: FlashAttention-2 takes multiples of 8 up to "
                                 f"256; choose a level without flash_cross_attention (e.g. host)")


class BuiltinModuleGuardFilter:
    """dynamo's guard filter for ``torch.compile(options={"guard_filter_fn": ...})``: PyTorch's own
    ``torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe``, which drops the guards whose source is a built-in
    module (``nn.Linear``, ``nn.Conv2d``, ``nn.GroupNorm``, ...: their hooks dicts, attributes, parameters), counting
    what each compile keeps. Unsafe in PyTorch's sense: a built-in module changed in place after compiling (a hook
    added, a parameter swapped for one of another shape) is not noticed. The levels change modules only before
    compiling, and a LoRA loaded later puts PEFT's modules in place of the built-in ones, which the kept guards on
    their parents see. Guards on diffusers' and sdxl-bench's own modules and processors (the cross K/V cache's zero
    rows, LoRA scales) stay."""

    name = "skip_guard_on_inbuilt_nn_modules_unsafe"

    def __init__(self) -> None:
        self._skip = getattr(torch.compiler, self.name, None)
        if self._skip is None:
            raise InvalidConfigError(f"torch {torch.__version__} has no torch.compiler.{self.name} (newer PyTorch "
                                     f"releases have it); choose a level without skip_builtin_module_guards "
                                     f"(e.g. lean)")
        self.compiles = 0
        self.guards = 0
        self.kept = 0

    def __call__(self, entries: list[Any]) -> list[bool]:
        keep = list(self._skip(entries))
        self.compiles += 1
        self.guards += len(keep)
        self.kept += sum(map(bool, keep))
        return keep

    def stats(self) -> dict[str, int]:
        return {"compiles": self.compiles, "guards": self.guards, "kept": self.kept}


def _compile_args(compile_mode: str, guard_filter: BuiltinModuleGuardFilter | None) -> dict[str, Any]:
    """``torch.compile`` keywords for ``compile_mode``: ``mode``, or the same mode as ``options`` (torch.compile
    takes one or the other) when a guard filter goes along."""
    if guard_filter is None:
        return {"mode": None if compile_mode == "default" else compile_mode}
    from torch._inductor import list_mode_options

    return {"options": {**list_mode_options(compile_mode, False), "guard_filter_fn": guard_filter}}


def apply_level(pipes: Pipelines, level: OptimizationLevel) -> Pipelines:
    """Apply ``level`` to ``pipes`` in place (dtype, attention, layout, fusion, VAE upcast, compile)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    mods = _modules(pipes)
    for module in mods.values():
        module.to(dtype=level.torch_dtype)
    pipes.kernel_backends = set_kernel_backends(level, pipes.device, level.torch_dtype)
    unets = [mods["unet"]] + ([mods["unet_refiner"]] if "unet_refiner" in mods else [])
    for module in unets + [mods["vae"]]:
        module.set_attn_processor(AttnProcessor2_0() if level.sdpa else AttnProcessor())
    if level.channels_last:
        for module in unets + [mods["vae"]]:
            module.to(memory_format=torch.channels_last)
    if level.fused_qkv:
        pipes.base.fuse_qkv_projections(unet=True, vae=True)
        if pipes.refiner is not None:
            pipes.refiner.fuse_qkv_projections(unet=True, vae=False)  # the VAE is shared and already fused
    if level.vae_classic_attention:  # after fusion, which gives the VAE a fused SDPA processor
        mods["vae"].set_attn_processor(AttnProcessor())
    mods["vae"].register_to_config(force_upcast=level.vae_upcast)
    if level.fuse_lora and getattr(pipes.base, "get_list_adapters", None) and pipes.base.get_list_adapters():
        pipes.base.fuse_lora(components=["unet"], lora_scale=1.0)
        pipes.base.unload_lora_weights()
    if level.fp8_geglu:
        from sdxl_core.fp8 import check_fp8_device, convert_geglu_projections

        check_fp8_device(pipes.device)
        pipes.kernel_backends["fp8_geglu_layers"] = sum(convert_geglu_projections(u, level.torch_dtype) for u in unets)
    if level.subpixel_upsample:  # after the dtype and layout changes: it derives its weights from the layers'
        from sdxl_core.subpixel import convert_upsamplers

        pipes.kernel_backends["subpixel_upsamplers"] = sum(convert_upsamplers(m) for m in unets + [mods["vae"]])
    guard_filter = None
    if level.skip_builtin_module_guards:  # a torch without the helper compiles with all guards, and says so
        available = hasattr(torch.compiler, BuiltinModuleGuardFilter.name)
        guard_filter = BuiltinModuleGuardFilter() if available else None
        pipes.kernel_backends["guard_filter"] = BuiltinModuleGuardFilter.name if available else \
            f"unavailable in torch {torch.__version__}: all guards kept"
    pipes.guard_filter = guard_filter
    if level.compile_mode is not None:
        configure_inductor()
        # dynamic=False: every batch size gets its own static graph rather than a slower symbolic one.
        for module in unets:
            module.compile(fullgraph=True, dynamic=False, **_compile_args(level.compile_mode, guard_filter))
        mods["vae"].decoder.compile(fullgraph=True, dynamic=False, **_compile_args(level.compile_mode, guard_filter))
    if level.compile_text_encoders:
        configure_inductor()
        # Default mode, no CUDA graphs: compel keeps one call's outputs while it makes the next (text_encoder_graphs
        # records graphs of its own, whose outputs it copies).
        for name in ("text_encoder", "text_encoder_2"):
            if level.text_encoder_graphs:  # one graph per call to capture, not two pieces
                from sdxl_core.text_graphs import install_output_capture_hooks

                install_output_capture_hooks(mods[name])
            mods[name].compile(dynamic=False, **_compile_args("default", guard_filter))
    if level.cache_cross_kv:  # last: it records the attention layout that fusion and LoRA set up
        from sdxl_core.cross_kv import install

        caches = [install(pipe) for pipe in (pipes.base, pipes.refiner) if pipe is not None]
        pipes.kernel_backends["cross_kv_layers"] = sum(len(cache.layers) for cache in caches)
        pipes.kernel_backends["cross_kv_skip_zero_text"] = [cache.skip_zero_text for cache in caches]
        for cache in caches:
            for attn in cache.layers:
                if level.flash_cross_attention:
                    _check_flash_head_dim(attn, pipes.device)
                attn.processor.flash = level.flash_cross_attention
        pipes.kernel_backends["cross_attention"] = "flash" if level.flash_cross_attention else "sdpa"
    pipes.share_text_embeddings = level.share_text_embeddings
    pipes.images_on_device = level.images_on_device
    pipes.fast_prompt_parse = level.fast_prompt_parse
    pipes.sync_free_compel = level.sync_free_compel
    # Last, when the components are where they run: both remember what diffusers computes now.
    from sdxl_core.host_work import EmptyNegativeCache, pin_execution_device

    pipes.sync_free_stage_starts = False
    if level.sync_free_stage_starts:  # before pinning, which subclasses the pipeline class it finds
        from sdxl_core.stage_starts import is_sync_free, sync_free_stage_start

        stage_pipes = [pipe for pipe in (pipes.base, pipes.refiner) if pipe is not None]
        pipes.kernel_backends["stage_starts"] = [sync_free_stage_start(pipe) for pipe in stage_pipes]
        pipes.sync_free_stage_starts = all(is_sync_free(pipe) for pipe in stage_pipes)
    if level.pin_execution_device:
        for pipe in (pipes.base, pipes.refiner):
            if pipe is not None:
                pin_execution_device(pipe)
    pipes.empty_negative = EmptyNegativeCache(pipes.refiner) \
        if level.cache_empty_negative and pipes.refiner is not None else None
    pipes.text_encoder_graphs = {}
    if level.text_encoder_graphs:
        from sdxl_core.text_graphs import graph_text_encoders

        pipes.kernel_backends["text_encoder_graphs"] = graph_text_encoders(pipes)
    return pipes
