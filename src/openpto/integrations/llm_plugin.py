"""The ``llm`` plugin: our models as ``llm`` models, running in this process on our engine.

``llm`` loads this module through the ``llm`` entry point ``openpto`` (``pip install
'openpto[llm]'``). It registers

- ``opt/smollm2-135m`` (the default model) and ``opt/<id>`` for every artifact ``opt models
  list`` knows, each with a sync and an async variant, streaming, and the options ``-o
  temperature``, ``top_p``, ``top_k``, ``max_tokens``, ``seed``; every prompt is an ``opt
  generate`` run in the run database;
- the embedding model ``opt/smollm2-135m`` (and one per artifact): mean-pooled, L2-normalised
  last hidden states, as ``opt serve``'s ``/v1/embeddings``;
- with ``OPT_SERVE_URL`` set (``OPT_API_KEY`` for its key), every model that ``opt serve`` lists
  at that address as ``opt-serve/<id>``, through llm's own OpenAI-compatible client.

Tools (``llm --tool``/``-T``, ``--functions``) go through ``openpto.engines.tool_calls``: the
tools are written into the prompt (by the chat template when it renders tools, else as a system
block), and ``<tool_call>`` blocks in the reply become llm tool calls, held back from the
streamed text. Starting ``llm`` imports no torch: the model loads on the first prompt, once per
process.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from collections.abc import AsyncGenerator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import llm
from pydantic import Field

DEFAULT_MAX_TOKENS = 256
MODEL_PREFIX = "opt/"
SERVE_PREFIX = "opt-serve/"


# -- which models ------------------------------------------------------------------------------


def local_models() -> list[tuple[str, str, list[str]]]:
    """``(llm model id, MODEL spec, aliases)``: the default alias, then each artifact in
    ``opt.db`` as ``opt/<folder name>`` (``opt/<id>`` too, the id ``opt models list`` shows)."""
    from openpto.models.aliases import DEFAULT_ALIAS
    from openpto.store.db import default_db_path

    found: list[tuple[str, str, list[str]]] = [(MODEL_PREFIX + DEFAULT_ALIAS, DEFAULT_ALIAS, [])]
    path = default_db_path()
    if not path.is_file():
        return found  # listing models must not create a database
    from openpto.store import Store

    taken = {found[0][0]}
    for row in Store(path).rows("models"):
        folder = Path(str(row.get("path") or ""))
        if not row.get("path") or not folder.is_dir():
            continue
        model_id = MODEL_PREFIX + folder.name
        if model_id in taken:
            model_id = f"{model_id}-{row['id']}"
        taken.add(model_id)
        found.append((model_id, str(folder), [MODEL_PREFIX + str(row["id"])]))
    return found


class _Runner:
    """One loaded model shared by a model's sync, async and embedding variants."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._loaded: Any = None
        self._engine: Any = None
        self._lock = threading.Lock()

    def loaded(self) -> Any:
        with self._lock:
            return self._load_unlocked()

    def _load_unlocked(self) -> Any:
        if self._loaded is None:
            import openpto

            self._loaded = openpto.load_model(
                self.spec, device=os.environ.get("OPT_LLM_DEVICE", "cpu"),
                dtype=os.environ.get("OPT_LLM_DTYPE", "float32"))
        return self._loaded

    def prompt_text(self, messages: Sequence[dict[str, Any]], tools: Sequence[Any] = ()) -> str:
        """The conversation (and its tools) through the model's chat template, without a BOS
        token that the tokenizer adds again."""
        from openpto.engines.tool_calls import chat_prompt

        tokenizer = self.loaded().tokenizer
        text = chat_prompt(tokenizer, messages, tools)
        bos = getattr(tokenizer, "bos_token", None)
        if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [
                tokenizer.bos_token_id]:
            text = text[len(bos):]
        return text

    def generation(self, messages: Sequence[dict[str, Any]], options: Any,
                   tools: Sequence[Any] = ()) -> Any:
        import openpto

        values = {
            "temperature": options.temperature, "top_p": options.top_p,
            "top_k": options.top_k, "seed": options.seed,
            "max_new_tokens": options.max_tokens or DEFAULT_MAX_TOKENS,
        }
        config = openpto.GenerationConfig(
            prompt=self.prompt_text(messages, tools), chat=False,
            **{k: v for k, v in values.items() if v is not None})
        return openpto.generate(self.loaded(), config)

    def embed(self, texts: list[str]) -> list[list[float]]:
        with self._lock:
            if self._engine is None:
                from openpto.engines.torch_backend import TorchEngine

                loaded = self._load_unlocked()
                self._engine = TorchEngine.from_model(loaded.model, loaded.tokenizer,
                                                      str(loaded.name))
                self._engine.load()
            engine = self._engine
        vectors: list[list[float]] = engine.embed(texts).result().vectors
        return vectors


_RUNNERS: dict[str, _Runner] = {}


def _runner(spec: str) -> _Runner:
    return _RUNNERS.setdefault(spec, _Runner(spec))


# -- conversations -----------------------------------------------------------------------------


def chat_messages(prompt: llm.Prompt, conversation: Any = None) -> list[dict[str, Any]]:
    """OpenAI-shaped messages for this turn with its history: llm >= 0.32 hands the whole
    chain over as ``prompt.messages``; older ones only the current turn, so the history comes
    from the conversation's earlier responses. Assistant tool calls become ``tool_calls``, tool
    results ``tool`` messages (``engines.tool_calls`` renders both)."""
    messages: list[dict[str, Any]] = []
    explicit = getattr(prompt, "_explicit_messages", None)
    if explicit is None and conversation is not None:
        for earlier in conversation.responses:
            if earlier.prompt.system and not messages:
                messages.append({"role": "system", "content": earlier.prompt.system})
            messages.append({"role": "user", "content": earlier.prompt.prompt})
            messages.append({"role": "assistant", "content": earlier.text_or_raise()})
    for part_message in prompt.messages:
        messages.extend(_openai_messages(part_message))
    merged: list[dict[str, Any]] = []
    for item in messages:  # a later system prompt replaces the first
        if item["role"] == "system" and merged and merged[0]["role"] == "system":
            merged[0] = item
        else:
            merged.append(item)
    return merged


def _openai_messages(message: Any) -> list[dict[str, Any]]:
    text = "".join(getattr(p, "text", "") or "" for p in message.parts
                   if type(p).__name__ == "TextPart")
    if message.role == "tool":
        return [{"role": "tool", "tool_call_id": p.tool_call_id, "name": p.name,
                 "content": p.exception or p.output} for p in message.parts
                if type(p).__name__ == "ToolResultPart"]
    calls = [{"id": p.tool_call_id or "", "type": "function",
              "function": {"name": p.name, "arguments": p.arguments}}
             for p in message.parts if type(p).__name__ == "ToolCallPart"]
    out: dict[str, Any] = {"role": message.role, "content": text}
    if calls:
        out["tool_calls"] = calls
    return [out]


def prompt_tools(prompt: llm.Prompt) -> list[Any]:
    """The prompt's function tools as ``engines.tool_calls.Tool``s (schemas checked)."""
    from openpto.engines.tool_calls import parse_tools

    return parse_tools([
        {"type": "function", "function": {"name": t.name, "description": t.description or "",
                                          "parameters": t.input_schema or {
                                              "type": "object", "properties": {}}}}
        for t in prompt.tools if isinstance(t, llm.Tool)])


class ReplySplitter:
    """Streamed text in; the content to show out, and at the end llm ``ToolCall``s for every
    well-formed ``<tool_call>`` block (a malformed one stays in the text, as the model wrote
    it)."""

    def __init__(self, tools: list[Any]) -> None:
        from openpto.engines.tool_calls import ToolCallStream

        self.tools = tools
        self.stream = ToolCallStream() if tools else None

    def push(self, text: str) -> str:
        return self.stream.push(text) if self.stream is not None else text

    def finish(self) -> tuple[str, list[llm.ToolCall]]:
        if self.stream is None:
            return "", []
        from openpto.engines.tool_calls import parse_reply

        held = self.stream.finish()
        if not self.stream.tail:
            return held, []
        parsed = parse_reply(self.stream.tail, self.tools)
        calls = [llm.ToolCall(name=c.name, arguments=json.loads(c.arguments),
                              tool_call_id=c.id) for c in parsed.tool_calls]
        return held + parsed.content, calls


class OptOptions(llm.Options):
    temperature: float | None = Field(None, ge=0, le=2,
                                      description="0 is greedy (default); higher is more random")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass; 1 is off")
    top_k: int | None = Field(None, ge=0, description="keep the K most likely tokens; 0 is off")
    max_tokens: int | None = Field(None, ge=1,
                                   description=f"most new tokens (default {DEFAULT_MAX_TOKENS})")
    seed: int | None = Field(None, description="seed for reproducible sampling")


def _usage(response: Any, generation: Any) -> None:
    summary = generation.summary
    if summary is not None:
        response.set_usage(input=summary.prompt_tokens, output=summary.tokens)


class OptModel(llm.Model):
    can_stream = True
    supports_tools = True

    class Options(OptOptions):
        pass

    def __init__(self, model_id: str, spec: str) -> None:
        self.model_id = model_id
        self.spec = spec

    def execute(self, prompt: llm.Prompt, stream: bool, response: Any,
                conversation: Any) -> Iterator[str]:
        tools = prompt_tools(prompt)
        splitter = ReplySplitter(tools)
        generation = _runner(self.spec).generation(chat_messages(prompt, conversation),
                                                   prompt.options, tools)
        for record in generation:
            if record.text and (shown := splitter.push(record.text)):
                yield shown
        rest, calls = splitter.finish()
        if rest:
            yield rest
        for call in calls:
            response.add_tool_call(call)
        _usage(response, generation)


class OptAsyncModel(llm.AsyncModel):
    can_stream = True
    supports_tools = True

    class Options(OptOptions):
        pass

    def __init__(self, model_id: str, spec: str) -> None:
        self.model_id = model_id
        self.spec = spec

    async def execute(self, prompt: llm.Prompt, stream: bool, response: Any,
                      conversation: Any) -> AsyncGenerator[str, None]:
        runner = _runner(self.spec)
        messages = chat_messages(prompt, conversation)
        tools = prompt_tools(prompt)
        splitter = ReplySplitter(tools)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def work() -> None:
            # One thread for the whole generation: its run record holds a SQLite connection,
            # which must stay in the thread that opened it.
            try:
                generation = runner.generation(messages, prompt.options, tools)
                for record in generation:
                    if record.text:
                        loop.call_soon_threadsafe(queue.put_nowait, ("text", record.text))
                loop.call_soon_threadsafe(queue.put_nowait, ("done", generation))
            except BaseException as exc:  # handed to the awaiting side, raised there
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

        threading.Thread(target=work, name="opt-llm-generate", daemon=True).start()
        while True:
            kind, value = await queue.get()
            if kind == "text":
                if shown := splitter.push(value):
                    yield shown
            elif kind == "error":
                raise value
            else:
                rest, calls = splitter.finish()
                if rest:
                    yield rest
                for call in calls:
                    response.add_tool_call(call)
                _usage(response, value)
                return


class OptEmbeddingModel(llm.EmbeddingModel):
    batch_size = 16

    def __init__(self, model_id: str, spec: str) -> None:
        self.model_id = model_id
        self.spec = spec

    def embed_batch(self, items: Iterable[str | bytes], *,
                    key: str | None = None) -> Iterator[list[float]]:
        texts = [item if isinstance(item, str) else item.decode("utf-8") for item in items]
        return iter(_runner(self.spec).embed(texts))


# -- a running opt serve -----------------------------------------------------------------------


def served_models(url: str, key: str | None) -> list[str]:
    """Model ids ``opt serve`` lists at ``url`` (``[]`` with one line on stderr when nothing
    answers: ``llm`` must start anyway)."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        reply = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=3.0)
        reply.raise_for_status()
        return [str(m["id"]) for m in reply.json().get("data", [])]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        sys.stderr.write(f"openpto: no opt serve models from OPT_SERVE_URL={url}: {exc}\n")
        return []


def _serve_models(register: Any) -> None:
    from llm.default_plugins.openai_models import AsyncChat, Chat

    url = os.environ.get("OPT_SERVE_URL")
    if not url:
        return
    key = os.environ.get("OPT_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else None
    base = url.rstrip("/") + "/v1"
    for name in served_models(url, key):
        kwargs = {"model_id": SERVE_PREFIX + name, "model_name": name, "api_base": base,
                  "headers": headers}
        chat: Any = Chat(**kwargs)
        async_chat: Any = AsyncChat(**kwargs)
        chat.needs_key = async_chat.needs_key = None
        register(chat, async_chat)


# -- the hooks ---------------------------------------------------------------------------------


@llm.hookimpl
def register_models(register: Any) -> None:
    for model_id, spec, aliases in local_models():
        register(OptModel(model_id, spec), OptAsyncModel(model_id, spec), aliases=aliases)
    _serve_models(register)


@llm.hookimpl
def register_embedding_models(register: Any) -> None:
    for model_id, spec, aliases in local_models():
        register(OptEmbeddingModel(model_id, spec), aliases=aliases)
