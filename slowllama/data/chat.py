"""Chat records as text: the model's own chat template (Jinja, from tokenizer_config.json), or
slowllama's plain template when the model has none; and which characters are the assistant's.

A template is a function render(messages, add_generation_prompt) -> str. The assistant's part of
turn i is found by rendering prefixes of the conversation: it is what render(messages[:i+1]) adds
to render(messages[:i], add_generation_prompt=True), i.e. the answer and whatever the template puts
after it (an end-of-turn token), but not the assistant header, which the prompt at inference has.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from typing import Callable

from slowllama.errors import SlowllamaError

Render = Callable[[list[dict], bool], str]
Span = tuple[int, int]  # [start, end) character offsets in the rendered text

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def plain_template(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """slowllama's template: "Role: content" turns joined by a blank line; the prompt ends "Assistant:"."""
    turns = [f"{PLAIN_ROLES[m['role']]}: {m['content']}" for m in messages]
    if add_generation_prompt:
        turns.append("Assistant:")
    # the prompt ends "Assistant:", so the space before an answer is part of the answer's tokens
    return "\n\n".join(turns)


def special_tokens(tokenizer) -> dict[str, int]:
    """Special-token strings a template may write (e.g. "<s>") and their ids.

    A tokenizer may say (attribute `special_tokens`); for sentencepiece they are its control pieces,
    which sentencepiece itself would encode as plain characters.
    """
    given = getattr(tokenizer, "special_tokens", None)
    if isinstance(given, dict):
        return dict(given)
    sp = getattr(tokenizer, "sp", None)
    if sp is not None:
        return {sp.IdToPiece(i): i for i in range(sp.GetPieceSize()) if sp.IsControl(i)}
    return {}  # e.g. the `tokenizers` library, which finds its added tokens in the text itself


def token_string(tokenizer, which: str) -> str:
    """The text of the BOS or EOS token (which: "bos" or "eos"), as templates write it."""
    given = getattr(tokenizer, f"{which}_token", None)
    if isinstance(given, str):
        return given
    wanted = getattr(tokenizer, f"{which}_id", None)
    return next((s for s, i in special_tokens(tokenizer).items() if i == wanted), "")


def special_encoder(tokenizer) -> Callable[[str], list[int]]:
    """encode(text) that maps special-token strings in the text to their ids, the rest through the tokenizer."""
    specials = {s: i for s, i in special_tokens(tokenizer).items() if s}
    if not specials:
        return lambda text: tokenizer.encode(text)
    pattern = re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")

    def encode(text: str) -> list[int]:
        ids = []
        for i, piece in enumerate(pattern.split(text)):
            if i % 2:  # the captured separators: special tokens
                ids.append(specials[piece])
            elif piece:
                ids.extend(tokenizer.encode(piece))
        return ids

    return encode


def jinja_template(source: str, bos_token: str, eos_token: str) -> Render:
    """A Hugging Face chat template (Jinja), rendered the way transformers does (sandboxed)."""
    try:
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise SlowllamaError("the model has a chat template, which needs jinja2: pip install 'slowllama[chat]'"
                             ) from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = BoundedSandbox(jinja2, ImmutableSandboxedEnvironment)(trim_blocks=True, lstrip_blocks=True,
                                                                extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        template = env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise SlowllamaError(f"the tokenizer's chat_template: Jinja syntax error at line {e.lineno}: {e.message}"
                             ) from None

    def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
        env.deadline = time.monotonic() + RENDER_SECONDS
        out, size = [], 0
        for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token, eos_token=eos_token):
            size += len(piece)
            if size > RENDER_CHARS:
                raise RenderLimit(f"its output passed {RENDER_CHARS} characters")
            env.check_time()
            out.append(piece)
        return "".join(out)

    return render


# a chat template renders one conversation: bounded in time and in output, so that a hostile
# tokenizer_config.json cannot hang or fill memory (three nested loops of range(100000) would)
RENDER_SECONDS = 10.0
RENDER_CHARS = 4 << 20
MAX_REPEAT = 1 << 20  # items of a string or list made by * in a template


class RenderLimit(Exception):
    """A chat template that went past the bounds of a render."""


def BoundedSandbox(jinja2, base):
    """The sandbox with bounds: every loop over range() checks the clock; * and ** are bounded."""

    class Bounded(base):
        intercepted_binops = frozenset(["*", "**", "+"])
        deadline = float("inf")

        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.globals["range"] = self.bounded_range

        def check_time(self) -> None:
            if time.monotonic() > self.deadline:
                raise RenderLimit(f"rendering took more than {RENDER_SECONDS:.0f} s")

        def bounded_range(self, *args):
            values = range(*args)
            if len(values) > MAX_REPEAT:
                raise RenderLimit(f"range() of {len(values)} items (at most {MAX_REPEAT})")
            return TimedRange(values, self.check_time)

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise RenderLimit(f"{left!r} ** {right!r}: exponent too large")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                        raise RenderLimit(f"a sequence repeated to {len(seq) * n} items (at most {MAX_REPEAT})")
            self.check_time()
            out = super().call_binop(context, operator, left, right)
            if isinstance(out, (str, list, tuple)) and len(out) > RENDER_CHARS:
                raise RenderLimit(f"a value of {len(out)} items (at most {RENDER_CHARS})")
            return out

    return Bounded


class TimedRange:
    """A range (len, indexing, |list, loop.length all work) whose iteration checks the render's clock."""

    def __init__(self, values: range, check: Callable[[], None]):
        self.values, self.check = values, check

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i):
        return self.values[i]

    def __iter__(self):
        for i, value in enumerate(self.values):
            if i % 1024 == 0:
                self.check()
            yield value

    def __reversed__(self):
        return iter(TimedRange(self.values[::-1], self.check))


def chat_template(tokenizer) -> tuple[Render, Callable[[str], list[int]], str]:
    """(render, encode, name) for a tokenizer: its chat template if it has one, else the plain template."""
    source = getattr(tokenizer, "chat_template", None)
    if source:
        render = jinja_template(source, token_string(tokenizer, "bos"), token_string(tokenizer, "eos"))
        return render, special_encoder(tokenizer), "the model's chat template"
    return plain_template, tokenizer.encode, "the plain chat template"


def assistant_spans(messages: list[dict], render: Render, where: str) -> tuple[str, list[Span]]:
    """The rendered conversation and the character spans of its assistant turns."""

    def call(msgs, gen):
        try:
            return render(msgs, gen)
        except RenderLimit as e:
            raise SlowllamaError(f"{where}: the chat template exceeds the bounds of a render: {e}") from None
        except RecursionError:
            raise SlowllamaError(f"{where}: the chat template recurses without end") from None
        except Exception as e:  # a template's raise_exception, or its own bug: name the record
            raise SlowllamaError(f"{where}: the chat template failed: {e}") from None

    text = call(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = call(messages[:i], True), call(messages[:i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise SlowllamaError(f"{where}: the chat template does not render this conversation turn by turn "
                                 "(a prefix of the chat is not a prefix of its text), so the assistant's "
                                 "tokens cannot be found; use --no-mask-prompt or prompt/completion records")
        spans.append((len(before), len(through)))
    return text, spans


def completion_spans(prompt: str, completion: str) -> tuple[str, list[Span]]:
    """A prompt/completion record: the two strings joined as they are; the completion carries the loss."""
    return prompt + completion, [(len(prompt), len(prompt) + len(completion))]
