"""Generation prompts beyond the corpus: built-in chat questions and a user's prompts file, as token ids.

A prompts file (`--prompts-file FILE`, UTF-8) is either
- plain text: one prompt per line (blank lines skipped), each tokenized as the tokenizer does by default
  (`tokenizer(text)`, so with a BOS token where the model wants one); or
- JSONL (the name ends in .jsonl or .json, or the first non-blank line starts with "{"): one JSON object per line,
  with a "prompt" string (tokenized like a plain line) or a "messages" list of {"role": str, "content": str}
  (rendered with the model's chat template and the assistant's generation prompt).
Every error names the file and, where it has one, the line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from driftscope.errors import ConfigError

# Built-in user questions for models with a chat template: short, everyday chat traffic.
CHAT_QUESTIONS = (
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for writing clear emails.",
    "Write a short poem about the sea.",
)


@dataclass(frozen=True)
class Prompt:
    text: str | None  # a raw prompt, tokenized as the tokenizer does by default
    messages: tuple[dict, ...] | None  # a chat, rendered with the chat template
    source: str  # where it came from, e.g. "file:prompts.jsonl:3" or "chat:0"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompts(count: int) -> list[Prompt]:
    """The first `count` built-in questions, each as a one-message user chat."""
    return [Prompt(None, ({"role": "user", "content": q},), f"chat:{i}") for i, q in enumerate(CHAT_QUESTIONS[:count])]


def _is_jsonl(path: Path, lines: list[str]) -> bool:
    if path.suffix.lower() in (".jsonl", ".json"):
        return True
    first = next((line for line in lines if line.strip()), "")
    return first.lstrip().startswith("{")


def _message(obj, where: str) -> dict:
    if not (isinstance(obj, dict) and isinstance(obj.get("role"), str) and isinstance(obj.get("content"), str)):
        raise ConfigError(f"{where}: each message must be an object with string 'role' and 'content', got {obj!r:.80}")
    return {"role": obj["role"], "content": obj["content"]}


def read_prompts_file(path: str | Path) -> list[Prompt]:
    """The prompts of a prompts file (see the module docstring); ConfigError naming the file and line otherwise."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise ConfigError(f"prompts file {str(p)!r} {what}; expected a UTF-8 text file (one prompt per line) "
                          f"or JSONL with a 'prompt' or 'messages' field per line")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"prompts file {str(p)!r} cannot be read ({e.strerror or e})") from None
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"prompts file {str(p)!r} line {line}: not UTF-8 text") from None
    out = []
    jsonl = _is_jsonl(p, lines)
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"prompts file {str(p)!r} line {n}"
        if not jsonl:
            out.append(Prompt(line, None, f"file:{p.name}:{n}"))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
            out.append(Prompt(obj["prompt"], None, f"file:{p.name}:{n}"))
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"]:
            out.append(Prompt(None, tuple(_message(m, where) for m in obj["messages"]), f"file:{p.name}:{n}"))
        else:
            got = f"keys {sorted(obj)}" if isinstance(obj, dict) else type(obj).__name__
            raise ConfigError(f"{where}: expected an object with a non-empty 'prompt' string or 'messages' list, "
                              f"got {got}")
    if not out:
        raise ConfigError(f"prompts file {str(p)!r} holds no prompts; expected one prompt per line "
                          f"(or JSONL with a 'prompt' or 'messages' field)")
    return out


def encode(prompt: Prompt, tokenizer) -> np.ndarray:
    """The prompt's token ids (int64). Chats need a tokenizer with a chat template."""
    if prompt.messages is None:
        ids = tokenizer(prompt.text)["input_ids"]
    else:
        if not has_chat_template(tokenizer):
            raise ConfigError(f"prompt {prompt.source} is a chat ('messages'), but the model's tokenizer has no chat "
                              f"template; give it as a 'prompt' string")
        text = tokenizer.apply_chat_template(list(prompt.messages), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        raise ConfigError(f"prompt {prompt.source} has no tokens")
    return ids
