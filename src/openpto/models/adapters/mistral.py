"""Mistral: Llama's modules and layout; llama.cpp reads it as its "llama" architecture."""

from __future__ import annotations

import dataclasses

from openpto.models.adapters import llama

ARCHITECTURE = dataclasses.replace(llama.ARCHITECTURE, model_type="mistral")
