"""Prompt sets for behavioural comparison: the built-in set (data/prompts.jsonl) and users' JSONL files."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from modelkin.errors import InputError

CATEGORIES = ("english", "chinese", "code", "maths", "facts", "instructions")


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt: a stable ``id``, a ``category`` (free text for user sets) and the ``prompt`` text."""

    id: str
    category: str
    prompt: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "category": self.category, "prompt": self.prompt}


def builtin_prompts() -> list[Prompt]:
    """The prompt set shipped with modelkin (72 prompts, 12 per category of CATEGORIES)."""
    text = resources.files("modelkin").joinpath("data/prompts.jsonl").read_text(encoding="utf-8")
    return parse_jsonl(text, where="built-in prompts")


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read a JSONL prompt file: one object per line with "prompt" and optional "id" and "category".

    Raises:
        InputError: the file cannot be read, a line is not a JSON object with a non-empty "prompt",
            ids repeat, or the file holds no prompt at all.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read prompt file {path}: {err.strerror or err}",
                         hint="pass an existing, readable JSONL file to --prompts") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"prompt file {path} is not UTF-8 text (byte {err.start})",
                         hint="save the file as UTF-8 JSONL") from err
    return parse_jsonl(text, where=str(path))


def parse_jsonl(text: str, *, where: str) -> list[Prompt]:
    """Parse JSONL prompt text; blank lines are skipped. See load_prompts for the format."""
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        prompt = _parse_line(line, lineno, where)
        if prompt.id in seen:
            raise InputError(f"{where}:{lineno}: prompt id {prompt.id!r} appears twice",
                             hint="give every prompt a unique \"id\"")
        seen.add(prompt.id)
        prompts.append(prompt)
    if not prompts:
        raise InputError(f"{where} holds no prompts",
                         hint='write one JSON object per line, e.g. {"prompt": "The capital of France is"}')
    return prompts


def _parse_line(line: str, lineno: int, where: str) -> Prompt:
    try:
        obj: Any = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}:{lineno}: not valid JSON ({err.msg})",
                         hint='write one JSON object per line, e.g. {"prompt": "…"}') from err
    if isinstance(obj, str):
        obj = {"prompt": obj}
    if not isinstance(obj, dict):
        raise InputError(f"{where}:{lineno}: expected a JSON object, got {type(obj).__name__}",
                         hint='write {"prompt": "…"} on each line')
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where}:{lineno}: missing or empty \"prompt\" string",
                         hint='every line needs a non-empty "prompt" field')
    pid = obj.get("id", f"line-{lineno}")
    category = obj.get("category", "user")
    return Prompt(id=str(pid), category=str(category), prompt=prompt)


def select_prompts(prompts: Sequence[Prompt], limit: int | None) -> list[Prompt]:
    """At most ``limit`` prompts, taken round-robin over categories so every category is represented.

    The order inside each category is kept, so the selection is deterministic.
    """
    if limit is None or limit >= len(prompts):
        return list(prompts)
    if limit < 1:
        raise InputError(f"the number of prompts must be at least 1, got {limit}",
                         hint="pass --max-prompts 1 or more")
    by_category: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_category.setdefault(p.category, []).append(p)
    queues = list(by_category.values())
    chosen: list[Prompt] = []
    depth = 0
    while len(chosen) < limit:
        for queue in queues:
            if depth < len(queue) and len(chosen) < limit:
                chosen.append(queue[depth])
        depth += 1
    return chosen


PromptsArg = str | os.PathLike[str] | Sequence[str | Prompt] | None


def resolve_prompts(prompts: PromptsArg, limit: int | None) -> list[Prompt]:
    """The prompts to run: the built-in set (None), a JSONL file path, or a list of texts/Prompts."""
    if prompts is None:
        chosen = builtin_prompts()
    elif isinstance(prompts, (str, os.PathLike)):
        chosen = load_prompts(prompts)
    else:
        items = list(prompts)
        if not items:
            raise InputError("the prompt set is empty", hint="pass at least one prompt")
        chosen = []
        for i, p in enumerate(items):
            if isinstance(p, Prompt):
                chosen.append(p)
            elif isinstance(p, str) and p.strip():
                chosen.append(Prompt(id=f"p{i:02d}", category="user", prompt=p))
            else:
                raise InputError(f"prompt {i} is empty or not a string", hint="pass non-empty strings")
        ids = [p.id for p in chosen]
        if len(set(ids)) != len(ids):
            raise InputError("prompt ids repeat in the prompt list", hint="give every prompt a unique id")
    return select_prompts(chosen, limit)
