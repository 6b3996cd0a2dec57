"""Generation engines: one interface over torch, llama.cpp and MLX, for every front end.

    from openpto.engines import EngineOptions, make_engine
    engine = make_engine("mlx", "smollm2-135m", EngineOptions())
    engine.load()
    final = run_to_completion(engine, engine.tokenize("Hello"), SamplingParams(max_tokens=8),
                              on_event=lambda e: print(e.text, end=""))

``opt serve`` puts the HTTP layer (``openpto.serving``) over an engine; ``opt generate
--backend`` streams from one directly. Backends load lazily: importing this package imports
neither torch's model code nor mlx nor llama_cpp.
"""

from openpto.engines.engine import (
    BACKENDS,
    Embeddings,
    Engine,
    EngineOptions,
    EngineStats,
    ModelInfo,
    make_engine,
    run_to_completion,
)
from openpto.engines.streams import RequestStream, StreamEvent, Timings

__all__ = ["BACKENDS", "Embeddings", "Engine", "EngineOptions", "EngineStats", "ModelInfo",
           "RequestStream", "StreamEvent", "Timings", "make_engine", "run_to_completion"]
