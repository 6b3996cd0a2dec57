"""Integrations with the tools people already run: Ollama and ``llm``."""
