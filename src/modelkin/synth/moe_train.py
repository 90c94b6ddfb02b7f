"""AdamW steps on any checkpoint the runtime loads (an upcycled Pangu MoGE model included), written back in
the checkpoint layout: backprop runs through the router's softmax weights and the experts' sorted loop.
"""

from __future__ import annotations

import os
import time
from typing import Any

from modelkin.synth import train


def load_trainable_any(source: str | os.PathLike[str]) -> tuple[dict[str, Any], Any, Any]:
    """(config, float32 model with gradients on, architecture module) of any checkpoint the runtime loads."""
    import torch

    from modelkin.checkpoint import open_checkpoint
    from modelkin.runtime.loader import load_model
    from modelkin.runtime.models import get_architecture

    with open_checkpoint(source) as src:
        config = {k: v for k, v in src.config().items() if not k.startswith("_")}
        model = load_model(src, device=torch.device("cpu"), dtype=torch.float32, progress=False)
    for param in model.parameters():
        param.data = param.data.clone()  # own the memory (the loader may map the file)
        param.requires_grad_(True)
    return config, model, get_architecture(config)


def finetune_any(source: str | os.PathLike[str], out: str | os.PathLike[str], *, steps: int, lr: float,
                 seed: int, tokens: Any, tokenizer_from: str | os.PathLike[str] | None = None, batch: int = 8,
                 seq: int = 64, **fit_options: Any) -> train.TrainResult:
    """``synth.train.finetune`` for any runtime architecture (MoE included); ``seed`` is the data order."""
    from modelkin.synth.variants import write_hf_checkpoint

    start = time.perf_counter()
    config, model, arch = load_trainable_any(source)
    losses = train.fit(model, tokens, steps=steps, lr=lr, data_seed=seed, batch=batch, seq=seq, **fit_options)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
             if not k.endswith("rotary_emb.inv_freq")}
    if getattr(model.args, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    tensors = arch.to_checkpoint(state, model.args)
    path = write_hf_checkpoint(out, config, tensors, tokenizer_from=tokenizer_from or source)
    return train.TrainResult(path, losses, time.perf_counter() - start, steps, steps * batch * seq, model)
