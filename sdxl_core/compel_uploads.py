"""compel's embeddings without host syncs: its arithmetic, with the host's numbers kept on the host.

compel makes each prompt's embeddings with 6-7 host syncs per text encoder (run 6's sync count on an H100, per
image: 13 in compel against 76 in all). Three are ``torch.tensor(list, device=cuda)`` copies of the token ids,
weights and mask from pageable memory; one reads the token ids back (``tokens.tolist()``) to find each fragment's
tokens; one asks the device whether every weight is 1 (``torch.all``), right after the encoder's call, so the host
waits for the encoder's kernels; one more copies the blend weights, and the pooled pass copies its token ids. Each
sync leaves the device idle while the host catches up and the host idle while the device finishes.

:class:`UploadingEmbeddingsProvider` is compel's ``EmbeddingsProvider`` with those steps changed and nothing else:
the lists become CPU tensors (the same ``torch.tensor`` call, on the CPU), which are copied to the device from
pinned memory without waiting (``non_blocking``), and every decision compel takes from a device tensor is taken
from the CPU tensor it was copied from, which holds the same numbers. The embeddings are then computed by compel's
own expressions, so they are bit-identical (``tests/test_compel_uploads.py`` compares them with compel's on
generated prompts: weighted, down-weighted in both of compel's down-weight modes, over-long, empty).

It covers prompts truncated to the encoder's length (compel's default, ``truncate_long_prompts=True``: one chunk of
77 tokens) and penultimate or last hidden states; other cases (long prompts split into chunks, pooled-only
providers, ``MERGE_CLS_TOKENS``, another dtype for the device than for the CPU) go to compel's own code, syncs and
all. On the CPU there is nothing to wait for, so only the arithmetic is at stake there.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from sdxl_core.errors import InvalidConfigError

HOST = torch.device("cpu")


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the CPU) on ``device``: from pinned memory without waiting when ``device`` is a GPU (the
    caching host allocator keeps the pinned block until the copy is done), else ``tensor.to(device)``."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@functools.cache
def provider_class() -> type:
    """The :class:`UploadingEmbeddingsProvider` class (made at first use: compel is imported then)."""
    from compel.embeddings_provider import (DownweightMode, EmbeddingsProvider, ReturnedEmbeddingsType,
                                            SplitLongTextMode, _get_pooled_output_from_text_encoder_output)

    class UploadingEmbeddingsProvider(EmbeddingsProvider):
        """compel's ``EmbeddingsProvider`` whose host numbers stay on the host (see the module's text)."""

        def _uploads_apply(self, text_batch: list[list[str]], weights_batch: list[list[float]],
                           device: torch.device) -> bool:
            return (self.truncate_to_model_max_length
                    and self.returned_embeddings_type != ReturnedEmbeddingsType.POOLED
                    and SplitLongTextMode.MERGE_CLS_TOKENS not in self.split_long_text_mode
                    and len(text_batch) == len(weights_batch)
                    and self.get_dtype_for_device(device) == self.get_dtype_for_device(HOST))

        def get_embeddings_for_weighted_prompt_fragments(self, text_batch: list[list[str]],
                                                         fragment_weights_batch: list[list[float]],
                                                         should_return_tokens: bool = False,
                                                         device: Any = "cpu") -> Any:
            device = torch.device(device)
            if not self._uploads_apply(text_batch, fragment_weights_batch, device):
                return super().get_embeddings_for_weighted_prompt_fragments(
                    text_batch, fragment_weights_batch, should_return_tokens=should_return_tokens, device=device)
            batch_z = batch_tokens = None
            for fragments, weights in zip(text_batch, fragment_weights_batch):
                host_tokens, host_weights, host_mask = self.get_token_ids_and_expand_weights(fragments, weights,
                                                                                            device=HOST)
                tokens, per_token_weights, mask = (upload(t, device) for t in (host_tokens, host_weights, host_mask))
                embeddings = self._weighted(tokens, per_token_weights, host_weights, mask, device).unsqueeze(0)
                per_embedding_weights = [1.0]
                # compel's down-weighting (weights < 1), with the fragments' token ranges found in the host's ids
                ranges = self._get_token_ranges_for_fragments(host_tokens.tolist(), fragments)
                for index in range(len(ranges)):
                    fragment_weight = weights[index]
                    if fragment_weight >= 1:
                        continue
                    if self.downweight_mode == DownweightMode.MASK:
                        start, end = ranges[index]
                        mask_without = mask.clone()
                        mask_without[start:end + 1] = 0
                        without = self._weighted(tokens, per_token_weights, host_weights, mask_without, device)
                    else:
                        ids, token_weights, _ = self.get_token_ids_and_expand_weights(
                            fragments[:index] + fragments[index + 1:], weights[:index] + weights[index + 1:],
                            device=HOST)
                        without = self._weighted(upload(ids, device), upload(token_weights, device), token_weights,
                                                 None, device)
                    embeddings = torch.cat((embeddings, without.unsqueeze(0)), dim=1)
                    fragment_weight = max(1e-5, fragment_weight)
                    per_embedding_weights.append(math.tan((1.0 - fragment_weight) * math.pi / 2))
                lerped = self._blend(embeddings, per_embedding_weights).squeeze(0)
                batch_z = lerped.unsqueeze(0) if batch_z is None else torch.cat([batch_z, lerped.unsqueeze(0)], dim=1)
                batch_tokens = tokens.unsqueeze(0) if batch_tokens is None else \
                    torch.cat([batch_tokens, tokens.unsqueeze(0)], dim=1)
            batch_z = batch_z.to(self.text_encoder.device, dtype=self.text_encoder.dtype)
            return (batch_z, batch_tokens) if should_return_tokens else batch_z

        def _weighted(self, token_ids: torch.Tensor, per_token_weights: torch.Tensor, host_weights: torch.Tensor,
                      attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
            """compel's ``build_weighted_embedding_tensor`` for one 77-token chunk; whether every weight is 1 is
            read from ``host_weights`` (what ``per_token_weights`` was copied from)."""
            z = self._encode_token_ids_to_embeddings(token_ids.unsqueeze(0),
                                                     None if attention_mask is None else attention_mask.unsqueeze(0))
            expanded = per_token_weights.reshape(per_token_weights.shape + (1,)).expand(z.shape).to(z.device)
            if not z.numel() or (self.bypass_when_no_weights and bool(torch.all(host_weights == 1))):
                return z  # compel: torch.all(identity_mask), identity_mask = expanded == 1 (zeros without bypass)
            identity_mask = expanded == 1 if self.bypass_when_no_weights else torch.zeros_like(expanded).bool()
            empty_z = self.empty_z.to(device)
            return torch.where(identity_mask, z, empty_z + ((z - empty_z) * expanded))

        @staticmethod
        def _blend(embeddings: torch.Tensor, per_embedding_weights: list[float]) -> torch.Tensor:
            """compel's ``apply_embedding_weights(..., normalize=True)`` with the weights uploaded."""
            weights = upload(torch.tensor(per_embedding_weights, dtype=embeddings.dtype), embeddings.device)
            weights = weights / torch.sum(weights)
            return torch.sum(embeddings * weights.reshape(weights.shape + (1, 1)), dim=1)

        def get_pooled_embeddings(self, texts: list[str], attention_mask: torch.Tensor | None = None,
                                  device: Any = None, return_tokens: bool = False) -> Any:
            device = torch.device(device or self.device)
            token_ids = self.get_token_ids(texts, padding="max_length", truncation_override=True)
            token_ids = upload(torch.tensor(token_ids, dtype=torch.long), device)
            pooled = _get_pooled_output_from_text_encoder_output(
                self.text_encoder(token_ids, attention_mask, return_dict=True))
            return (pooled, token_ids) if return_tokens else pooled

    return UploadingEmbeddingsProvider


def use_uploads(compel: Any) -> int:
    """Switch the embeddings providers of a ``compel.Compel`` to :class:`UploadingEmbeddingsProvider` (in place:
    the same objects, tokenizers and encoders); returns how many were switched. A provider of another class than
    compel's own is refused, since its overrides would be lost."""
    from compel.embeddings_provider import EmbeddingsProvider

    cls = provider_class()
    conditioning = compel.conditioning_provider
    providers = getattr(conditioning, "embedding_providers", [conditioning])
    for provider in providers:
        if type(provider) not in (EmbeddingsProvider, cls):
            raise InvalidConfigError(f"compel's embeddings provider is a {type(provider).__name__}, not compel's "
                                     f"EmbeddingsProvider; switch sync_free_compel off for this compel")
    for provider in providers:
        provider.__class__ = cls
    return len(providers)
