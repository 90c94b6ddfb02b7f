"""The public runtime API: ``modelkin.load(path) -> Model`` with logits, generate and score."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from modelkin.errors import InputError, TokenizerError
from modelkin.runtime.config import SamplingParams
from modelkin.runtime.continuations import Continuation, prefill_decode
from modelkin.runtime.generate import GenerationResponse, stream_generate
from modelkin.runtime.kv_cache import attention_mask, positions_from_mask
from modelkin.runtime.moe import telemetry as moe_telemetry
from modelkin.runtime.results import GenerationResult, ScoreResult, collect_result, score_logprobs


class Model:
    """A loaded causal LM on one backend, with its tokenizer (None when the checkpoint has none).

    Attributes:
        module: the architecture's ``nn.Module``.
        config: its ModelArgs.
        tokenizer: the Tokenizer, or None.
        backend, device, dtype: where and how it runs.
        eos_token_ids: every id that ends generation (config, generation_config, tokenizer).
        routing_telemetry: MoE models: the RoutingTelemetry of the latest generation call, else None.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        tokenizer: Any | None,
        backend: Any,
        dtype: torch.dtype,
        path: str,
        generation_config: dict[str, Any] | None = None,
    ):
        self.module = module
        self.config = module.args
        self.tokenizer = tokenizer
        self.backend = backend
        self.device = backend.device
        self.dtype = dtype
        self.path = path
        self.eos_token_ids = _eos_ids(self.config, generation_config or {}, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        pad = self.config.pad_token_id if pad is None else pad
        # ids outside the vocabulary (old configs say pad_token_id=-1) cannot pad: fall back to an EOS, or 0
        vocab = self.config.vocab_size
        usable = [int(i) for i in (pad, *sorted(self.eos_token_ids)) if isinstance(i, int) and 0 <= i < vocab]
        self.pad_token_id = usable[0] if usable else 0
        self.routing_telemetry = moe_telemetry.RoutingTelemetry() if moe_telemetry.has_moe(module) else None

    def __repr__(self) -> str:
        return f"<modelkin.Model {self.config.model_type} {self.path} on {self.device} {self.dtype}>"

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    # -- logits ---------------------------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """Float32 logits [B, T, V] on the model's device for every position.

        Args:
            input_ids: a LongTensor [B, T], or a list of id lists; ragged lists are right-padded
                (rows shorter than T get logits of padding at their end, to be ignored).

        Raises:
            InputError: empty input, ids outside the vocabulary, or longer than the context.
        """
        ids_BT, mask_BT = self._batch(input_ids)
        ids_BT, mask_BT = ids_BT.to(self.device), mask_BT.to(self.device)
        mask_BTS = attention_mask(mask_BT.bool(), 0, ids_BT.shape[1], self.module.sliding_window)
        with torch.inference_mode():
            out = self.module(ids_BT, positions_BL=positions_from_mask(mask_BT), mask_BLS=mask_BTS)
        return out.float()

    def _batch(self, input_ids: torch.Tensor | Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
                raise InputError(
                    f"input_ids must be an integer tensor [B, T], got {input_ids.dtype} "
                    f"{list(input_ids.shape)}"
                )
            rows = input_ids.tolist()
        else:
            rows = [list(r) for r in input_ids]
        if not rows or any(len(r) == 0 for r in rows):
            raise InputError("input_ids is empty or holds an empty sequence", hint="pass at least one token")
        self._check_ids(rows)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids, mask

    def _check_ids(self, rows: Sequence[Sequence[int]], extra: int = 0) -> None:
        vocab = self.config.vocab_size
        bad = [t for r in rows for t in r if not 0 <= int(t) < vocab]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        longest = max(len(r) for r in rows)
        if longest + extra > self.context_length:
            raise InputError(
                f"sequence of {longest} tokens is longer than the model's context of "
                f"{self.context_length} (max_position_embeddings)",
                hint="shorten the prompt or text",
            )

    # -- generation -----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[int], *, chat: bool = False) -> list[int]:
        """Token ids of a prompt; ``chat`` wraps a text prompt in the model's chat template."""
        if not isinstance(prompt, str):
            ids = [int(t) for t in prompt]
            if chat:
                raise InputError("chat=True needs a text prompt, not token ids")
            return ids
        tok = self._require_tokenizer("encode a text prompt")
        if chat:
            if not tok.has_chat_template:
                raise TokenizerError(f"{self.path} has no chat template", hint="run without --chat")
            # BOS once when the tokenizer adds one and the template does not write it (Pangu)
            return tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return tok.encode(prompt, add_special_tokens=True)

    def stream(
        self, prompts: Sequence[str | Sequence[int]], *, chat: bool = False, **sampling: Any
    ) -> Iterator[GenerationResponse]:
        """Stream responses (one per new token per prompt) for a batch of prompts."""
        params = _sampling_params(**sampling)
        if params.stop and self.tokenizer is None:
            self._require_tokenizer("check stop strings")
        ids = [self.encode_prompt(p, chat=chat) for p in prompts]
        if any(not p for p in ids):
            raise InputError("a prompt encodes to zero tokens", hint="pass a non-empty prompt")
        self._check_ids(ids)
        room = self.context_length - max(len(p) for p in ids)
        params = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, room))
        responses = stream_generate(
            self.module, self.tokenizer, ids, params, eos_ids=self.eos_token_ids, pad_id=self.pad_token_id
        )
        if self.routing_telemetry is None:
            yield from responses
            return
        self.routing_telemetry.reset()
        with self.routing_telemetry.recording(self.module):
            yield from responses

    def generate_batch(
        self, prompts: Sequence[str | Sequence[int]], *, chat: bool = False, **sampling: Any
    ) -> list[GenerationResult]:
        """Generate for several prompts at once (left-padded batch); one result per prompt."""
        ids = [self.encode_prompt(p, chat=chat) for p in prompts]
        got: list[list[GenerationResponse]] = [[] for _ in prompts]
        for response in self.stream(ids, **sampling):
            got[response.index].append(response)
        routing = self.routing()
        return [dataclasses.replace(collect_result(p, rs), routing=routing) for p, rs in zip(ids, got)]

    def generate(
        self,
        prompt_or_ids: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        chat: bool = False,
    ) -> GenerationResult:
        """Continue one prompt (text or token ids); greedy unless ``temperature > 0``.

        Raises:
            InputError: bad sampling options, or a prompt longer than the context.
            TokenizerError: a text prompt (or stop strings) and no tokenizer.
            NumericalError: the model produced NaN/Inf logits.
        """
        sampling = {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "min_p": min_p,
            "seed": seed,
            "stop": stop,
        }
        return self.generate_batch([prompt_or_ids], chat=chat, **sampling)[0]

    def prefill_decode(
        self, prompts: Sequence[Sequence[int]], rows: Sequence[Continuation], **options: Any
    ) -> list[list[int]]:
        """``continuations.prefill_decode`` on this model (its EOS ids and pad id; ``options``: on_logits,
        budgets, sample_dtype): ids per row. MoE models record the routing of the prompt tokens only.

        Raises:
            InputError: an empty prompt, ids outside the vocabulary, or too long for the context.
        """
        if any(not p for p in prompts):
            raise InputError("a prompt holds zero tokens", hint="pass a non-empty prompt")
        self._check_ids(prompts)
        room = [self.context_length - len(p) for p in prompts]
        rows = [dataclasses.replace(r, max_new_tokens=max(1, min(r.max_new_tokens, room[r.prompt])))
                for r in rows]
        tele = self.routing_telemetry
        if tele is not None:
            tele.reset()
            options["record"] = lambda: tele.recording(self.module)
        return prefill_decode(self.module, prompts, rows, eos_ids=self.eos_token_ids,
                              pad_id=self.pad_token_id, **options)

    # -- scoring --------------------------------------------------------------------------------
    def score(self, text: str) -> ScoreResult:
        """Log-likelihood and bits per byte of ``text``.

        BOS policy: the text is encoded as the tokenizer does by default. If that adds a BOS token,
        every text token is scored given BOS. If not, the first token has nothing to condition on
        and is not scored: tokens 1..n-1 are scored, while ``n_bytes`` still counts the whole text.

        Raises:
            TokenizerError: the checkpoint has no tokenizer.
            InputError: the text encodes to fewer than two tokens or exceeds the context.
        """
        tok = self._require_tokenizer("score text")
        ids = tok.encode(text, add_special_tokens=True)
        if len(ids) < 2:
            raise InputError(
                f"text encodes to {len(ids)} token(s); scoring needs at least 2", hint="score a longer text"
            )
        return score_logprobs(self.logits([ids])[0].log_softmax(dim=-1), ids, text)

    def routing(self) -> dict[str, Any] | None:
        """MoE routing telemetry of the latest generation call (``RoutingTelemetry.to_json()``), or
        None for a dense model."""
        return self.routing_telemetry.to_json() if self.routing_telemetry is not None else None

    def _require_tokenizer(self, action: str) -> Any:
        if self.tokenizer is None:
            raise TokenizerError(
                f"cannot {action}: the checkpoint {self.path} has no tokenizer files",
                hint="add tokenizer.json / tokenizer.model beside the weights, or pass token ids",
            )
        return self.tokenizer


def _sampling_params(**kw: Any) -> SamplingParams:
    stop = kw.pop("stop", None)
    kw["stop"] = (stop,) if isinstance(stop, str) else tuple(stop or ())
    params = SamplingParams(**{k: v for k, v in kw.items() if v is not None})
    if params.max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
    if params.temperature < 0 or not math.isfinite(params.temperature):
        raise InputError(f"temperature must be >= 0, got {params.temperature}")
    if params.top_k is not None and params.top_k < 1:
        raise InputError(f"top_k must be >= 1, got {params.top_k}")
    for name in ("top_p", "min_p"):
        value = getattr(params, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise InputError(f"{name} must be in [0, 1], got {value}")
    return params


def _eos_ids(args: Any, generation_config: dict[str, Any], tokenizer: Any | None) -> set[int]:
    ids = set(args.eos_ids())
    gen = generation_config.get("eos_token_id")
    if gen is not None:
        ids |= {int(gen)} if isinstance(gen, int) else {int(g) for g in gen}
    if tokenizer is not None:
        ids |= set(tokenizer.eos_token_ids)
    return ids


def load(
    path: str | os.PathLike[str],
    device: str | Any = "auto",
    dtype: str | torch.dtype = "auto",
    allow_fallback: bool | None = None,
    *,
    progress: bool | None = None,
    parallel: Any = None,
    gemv_layout: bool = True,
) -> Model:
    """Load a checkpoint (HF directory, .gguf, …) onto a device, ready to run.

    Args:
        path: a model directory or file that ``open_checkpoint`` understands.
        device: "auto", "cpu", "cuda[:i]", "npu[:i]" or a Backend (ignored with ``parallel``).
        dtype: "auto" (float32 on CPU, bfloat16 on accelerators), or a dtype name.
        allow_fallback: run on CPU when the device is unavailable (None: MODELKIN_ALLOW_FALLBACK).
        progress: force the loading progress bar on or off (None: on a terminal, for big checkpoints).
        parallel: a ``runtime.parallel.DistContext``: load this rank's shard of a tensor/expert-parallel
            run on the context's device (call it on every rank). The Model's logits, generation and
            routing equal the single-process ones within float rounding; call its methods on every
            rank with the same arguments (and the same ``seed`` when sampling).
        gemv_layout: on CPU in float32, store wide Linear weights column-major (``prefer_gemv_layout``),
            the faster layout for one-sequence generation. Batched work (compare's prefill and decode
            batches) runs as fast row-major, with bit-identical outputs, and False skips the copy: 0.3 s
            and 0.13 GB of anonymous memory for SmolLM2-135M, whose mapped weights then stay page cache.

    Raises:
        CheckpointError, ConfigError, UnsupportedArchitectureError, DeviceError, InputError.

    Example:
        >>> m = modelkin.load("SmolLM2-135M-Instruct.Q4_1.gguf", device="cpu")
        >>> m.generate("The capital of France is", max_new_tokens=8).text
    """
    from modelkin.backends import get_backend
    from modelkin.checkpoint import open_checkpoint

    if parallel is not None:
        backend = parallel.backend
    else:
        backend = get_backend(device, allow_fallback=allow_fallback)
    torch_dtype = backend.resolve_dtype(dtype)
    with open_checkpoint(path) as source:
        return load_source(source, path, backend=backend, dtype=torch_dtype, parallel=parallel,
                           progress=progress, gemv_layout=gemv_layout)


def load_source(
    source: Any,
    path: str | os.PathLike[str],
    *,
    backend: Any,
    dtype: torch.dtype,
    parallel: Any = None,
    shard: Any = None,
    progress: bool | None = None,
    gemv_layout: bool = True,
) -> Model:
    """The one way a Model is made: build this rank's model on the meta device (unless ``shard``,
    a `runtime.parallel.shard.Shard`, was built already, e.g. to plan memory), read its weights
    from the open ``source``, add the tokenizer. One process is the 1 × 1 layout."""
    from modelkin.runtime.cpu_kernels import prefer_gemv_layout
    from modelkin.runtime.parallel.shard import build, read_weights
    from modelkin.tokenizer import load_tokenizer

    shard = shard or build(source, ctx=parallel)
    if parallel is not None and not parallel.is_main:
        progress = False  # rank 0 alone shows the bar
    module = read_weights(source, shard, device=backend.device, dtype=dtype, progress=progress)
    if gemv_layout and shard.layout.world_size == 1 and backend.name == "cpu" and dtype == torch.float32:
        prefer_gemv_layout(module)
    return Model(
        module,
        tokenizer=load_tokenizer(source, path),
        backend=backend,
        dtype=dtype,
        path=str(path),
        generation_config=source.config().get("_generation_config"),
    )
