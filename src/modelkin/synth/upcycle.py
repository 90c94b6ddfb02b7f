"""The upcycle builder (what `modelkin upcycle` runs): a Pangu-Pro-MoE-layout (MoGE) checkpoint written from a
dense Llama/Qwen2 checkpoint, the alleged derivation. The fingerprint method that detects such a derivation
is the upcycle detector, compare/fingerprints/upcycle.py.

Attention is copied (zero q/k/v/o biases added where the dense model has none); each layer's MLP
neurons are split at random into E routed experts and one shared expert; the router starts from each
expert's mean gate row; router_scale is ones; optional Gaussian noise of ``noise`` × each tensor's std.
Tensor names and config are those runtime/models/pangu_moe.py loads. Written to a temporary directory,
renamed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelkin.checkpoint import TensorSource, open_checkpoint
from modelkin.errors import ConfigError, InputError, TokenizerError
from modelkin.tokenizer.write import copy_tokenizer_files, write_gguf_tokenizer
from modelkin.utils import atomic_path

DENSE_TYPES = ("llama", "qwen2", "mistral")
SHARD_BYTES = 2 * 1024**3


@dataclass(frozen=True, kw_only=True)
class UpcycleSpec:
    """How to split the dense MLP: E routed experts of F neurons, a shared expert of S neurons, G groups."""

    experts: int
    groups: int
    moe_intermediate_size: int
    shared_intermediate_size: int


def plan(intermediate: int, experts: int, groups: int, shared_fraction: float) -> UpcycleSpec:
    """Sizes for splitting ``intermediate`` neurons; routed experts get equal shares, the rest is shared.

    Raises:
        InputError: impossible expert/group counts or shared fraction.
    """
    if experts < 1 or groups < 1 or experts % groups:
        raise InputError(f"--experts {experts} must be a positive multiple of --groups {groups}",
                         hint="MoGE splits the experts into equal contiguous groups, e.g. --experts 8 --groups 4")
    if not 0.0 <= shared_fraction < 1.0:
        raise InputError(f"--shared-fraction {shared_fraction} must be in [0, 1)", hint="e.g. 0.25")
    per_expert = int(intermediate * (1.0 - shared_fraction)) // experts
    if per_expert < 1:
        raise InputError(f"{intermediate} MLP neurons cannot feed {experts} experts with shared fraction "
                         f"{shared_fraction}", hint="use fewer experts or a smaller --shared-fraction")
    return UpcycleSpec(experts=experts, groups=groups, moe_intermediate_size=per_expert,
                       shared_intermediate_size=intermediate - per_expert * experts)


def pangu_config(dense: dict[str, Any], spec: UpcycleSpec, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the upcycled model (Pangu Pro MoE keys; no intermediate_size)."""
    keep = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "rope_theta", "rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id",
            "pad_token_id", "rope_scaling")
    cfg: dict[str, Any] = {"architectures": ["PanguProMoEForCausalLM"], "model_type": "PanguProMoE"}
    cfg.update({k: dense[k] for k in keep if dense.get(k) is not None})
    if dense.get("head_dim") and dense["head_dim"] != dense["hidden_size"] // dense["num_attention_heads"]:
        cfg["head_dim"] = dense["head_dim"]
    cfg.update({"hidden_act": "silu", "num_experts": spec.experts, "num_experts_per_tok": spec.groups,
                "moe_intermediate_size": spec.moe_intermediate_size,
                "shared_expert_intermediate_size": spec.shared_intermediate_size,
                "tie_word_embeddings": False, "router_aux_loss_coef": 0.001, "output_router_logits": False,
                "torch_dtype": str(dtype).removeprefix("torch.")})
    return cfg


class _ShardWriter:
    """Collects tensors and writes model-0000N.safetensors shards of about SHARD_BYTES each."""

    def __init__(self, folder: Path):
        self.folder, self.pending, self.size, self.shards = folder, {}, 0, []
        self.weight_map: dict[str, int] = {}
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        self.size, self.total = self.size + nbytes, self.total + nbytes
        if self.size >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        index = len(self.shards)
        save_file(self.pending, str(self.folder / f"shard-{index}.tmp"), metadata={"format": "pt"})
        self.weight_map.update({n: index for n in self.pending})
        self.shards.append(index)
        self.pending, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.folder / f"shard-{i}.tmp").rename(self.folder / name)
            (self.folder / name).chmod(0o644)  # safetensors creates its files owner-only
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: names[v] for k, v in sorted(self.weight_map.items())}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class _Noiser:
    """Adds N(0, (noise · std(t))²) to float tensors of more than one element, reproducibly."""

    def __init__(self, noise: float, seed: int, dtype: torch.dtype):
        self.noise, self.dtype = noise, dtype
        self.gen = torch.Generator().manual_seed(seed + 1)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        if self.noise > 0 and t.numel() > 1:
            t = t + torch.randn(t.shape, generator=self.gen) * (self.noise * float(t.std()))
        return t.to(self.dtype)


def _check_dense(src: TensorSource) -> dict[str, Any]:
    cfg = dict(src.config())
    if cfg.get("model_type") not in DENSE_TYPES:
        raise ConfigError(f"{src.path}: model_type {cfg.get('model_type')!r} is not a dense Llama/Qwen2 model",
                          hint=f"upcycle reads {', '.join(DENSE_TYPES)} checkpoints")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not cfg.get(key):
            raise ConfigError(f"{src.path}: config has no {key}", hint="add it to config.json")
    return cfg


def _out_dtype(dtype: str | torch.dtype | None, src: TensorSource, name: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        stored = src.info(name).torch_dtype  # quantised GGUF types dequantise to float32
        return stored if stored in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise InputError(f"unknown --dtype {dtype!r}", hint="use auto, float32, bfloat16 or float16")
    return table[dtype]


def _layer(src: TensorSource, i: int, spec: UpcycleSpec, put, gen: torch.Generator, router: str) -> dict:
    """Write layer i's tensors through ``put(name, tensor)``; returns its neuron partition."""
    p, names = f"model.layers.{i}.", set(src.keys())
    for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        put(p + norm, src.get_tensor(p + norm))
    for proj in ("q", "k", "v", "o"):
        w = src.get_tensor(f"{p}self_attn.{proj}_proj.weight")
        put(f"{p}self_attn.{proj}_proj.weight", w)
        bias = f"{p}self_attn.{proj}_proj.bias"
        put(bias, src.get_tensor(bias) if bias in names else torch.zeros(w.shape[0]))
    gate, up, down = (src.get_tensor(f"{p}mlp.{r}_proj.weight").float() for r in ("gate", "up", "down"))
    order = torch.randperm(gate.shape[0], generator=gen)
    f, e_count = spec.moe_intermediate_size, spec.experts
    chunks = [order[e * f:(e + 1) * f] for e in range(e_count)]
    shared = order[e_count * f:]
    router_rows = []
    for e, idx in enumerate(chunks):
        q = f"{p}mlp.experts.{e}."
        put(q + "gate_proj.weight", gate[idx])
        put(q + "up_proj.weight", up[idx])
        put(q + "down_proj.weight", down[:, idx])
        router_rows.append(gate[idx].mean(0))
    if router == "mean":
        weight = torch.stack(router_rows)
    else:
        weight = torch.randn(e_count, gate.shape[1], generator=gen) * 0.02
    put(p + "mlp.gate.weight", weight)
    put(p + "mlp.router_scale", torch.ones(1, e_count), noise=False)
    for r, t in (("gate", gate[shared]), ("up", up[shared]), ("down", down[:, shared])):
        put(f"{p}mlp.shared_expert.{r}_proj.weight", t)
    return {"experts": [c.tolist() for c in chunks], "shared": shared.tolist()}


def _tokenizer(src: TensorSource, dense: Path, out: Path) -> str:
    """Copy (HF dir) or write (GGUF byte-level BPE) the tokenizer; says what was done."""
    if src.format != "gguf":
        copied = copy_tokenizer_files(dense if dense.is_dir() else dense.parent, out)
        if not copied:
            return "none: the dense checkpoint has no tokenizer files"
        return f"copied {', '.join(copied)}"
    try:
        written = write_gguf_tokenizer(src.metadata(), str(dense), out)
    except TokenizerError as err:
        return f"not exported: {err.message}"
    return f"exported {', '.join(written[:-1])} and {written[-1]} from the GGUF vocabulary"


def upcycle(dense: str | Path, outdir: str | Path, *, experts: int, groups: int, shared_fraction: float = 0.25,
            noise: float = 0.0, seed: int = 0, dtype: str | torch.dtype | None = None, router: str = "mean",
            overwrite: bool = False) -> dict[str, Any]:
    """Write a Pangu-layout MoGE checkpoint upcycled from a dense Llama/Qwen2 checkpoint.

    Args:
        dense: HF directory, safetensors/.bin file or GGUF of a dense llama/qwen2/mistral model.
        outdir: new directory (config.json, model*.safetensors, tokenizer, modelkin_upcycle.json).
        experts / groups: routed experts E and MoGE groups G (= num_experts_per_tok; E % G == 0).
        shared_fraction: share of each layer's MLP neurons given to the shared expert (the rounding
            remainder of the routed split goes there too).
        noise: Gaussian noise added to every tensor, as a multiple of that tensor's std (0 = exact copy).
        seed: seeds the neuron partition, the router and the noise.
        dtype: output dtype (auto = the dense model's float dtype, float32 for quantised GGUF).
        router: "mean" (each expert's mean gate row) or "random" (N(0, 0.02²)).
        overwrite: replace a non-empty ``outdir``.

    Returns:
        A summary dict (also written to outdir/modelkin_upcycle.json without the partition).

    Raises:
        InputError, ConfigError, CheckpointError: bad options, not a dense Llama/Qwen2 model, unreadable.
    """
    dense, outdir = Path(dense), Path(outdir)
    if router not in ("mean", "random"):
        raise InputError(f"unknown --router {router!r}", hint="use mean or random")
    if outdir.exists() and (not outdir.is_dir() or any(outdir.iterdir())) and not overwrite:
        raise InputError(f"{outdir} already exists and is not empty", hint="choose a new directory or --overwrite")
    with open_checkpoint(dense) as src:
        cfg = _check_dense(src)
        spec = plan(int(cfg["intermediate_size"]), experts, groups, shared_fraction)
        out_dtype = _out_dtype(dtype, src, "model.layers.0.self_attn.q_proj.weight")
        noiser, gen = _Noiser(noise, seed, out_dtype), torch.Generator().manual_seed(seed)
        with atomic_path(outdir) as tmp:
            tmp.mkdir()
            writer = _ShardWriter(tmp)

            def put(name: str, tensor: torch.Tensor, noise: bool = True) -> None:
                writer.add(name, noiser(tensor) if noise else tensor.to(out_dtype))

            partition = {i: _layer(src, i, spec, put, gen, router) for i in range(int(cfg["num_hidden_layers"]))}
            embed = src.get_tensor("model.embed_tokens.weight")
            put("model.embed_tokens.weight", embed)
            put("model.norm.weight", src.get_tensor("model.norm.weight"))
            has_head = "lm_head.weight" in set(src.keys())
            # Pangu is untied; a copy, since safetensors refuses two names on one storage
            put("lm_head.weight", src.get_tensor("lm_head.weight") if has_head else embed.clone())
            writer.close()
            (tmp / "config.json").write_text(json.dumps(pangu_config(cfg, spec, out_dtype), indent=2) + "\n")
            summary = {"source": str(dense), "experts": experts, "groups": groups,
                       "moe_intermediate_size": spec.moe_intermediate_size,
                       "shared_expert_intermediate_size": spec.shared_intermediate_size,
                       "shared_fraction": shared_fraction, "noise": noise, "seed": seed, "router": router,
                       "dtype": str(out_dtype).removeprefix("torch."),
                       "tokenizer": _tokenizer(src, dense, tmp)}
            record = {**summary, "partition": partition}
            (tmp / "modelkin_upcycle.json").write_text(json.dumps(record, separators=(",", ":")) + "\n")
    return {**summary, "outdir": str(outdir)}
