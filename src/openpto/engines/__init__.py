"""Generation engines: one interface over torch, llama.cpp and MLX, for every front end.

    from openpto.engines import EngineOptions, engine_records, make_engine
    engine = make_engine("mlx", "smollm2-135m", EngineOptions())
    engine.load()
    for record in engine_records(engine, engine.tokenize("Hello"), SamplingParams(max_tokens=8)):
        print(record.text, end="")

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
    engine_records,
    make_engine,
)
from openpto.engines.streams import RequestStream

__all__ = ["BACKENDS", "Embeddings", "Engine", "EngineOptions", "EngineStats", "ModelInfo",
           "RequestStream", "engine_records", "make_engine"]
