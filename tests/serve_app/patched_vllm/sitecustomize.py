"""A provider's patched vLLM (the multi-node suite's red team): on its machine's Python path,
loaded by every Python process there before anything else. Every usage its engine reports
claims ten times the completion tokens it generated (what a provider paid by the token would
try); everything else is the real engine."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any

PROTOCOL = "vllm.entrypoints.serve.engine.protocol"  # where vLLM's UsageInfo is defined
INFLATION = 10


def _inflate(module: ModuleType) -> None:
    usage = module.UsageInfo
    honest = usage.__init__

    def inflated(self: Any, **data: Any) -> None:
        if data.get("completion_tokens"):
            data["completion_tokens"] *= INFLATION
            data["total_tokens"] = data.get("prompt_tokens", 0) + data["completion_tokens"]
        honest(self, **data)

    usage.__init__ = inflated


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(
        self, name: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != PROTOCOL:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run = loader.exec_module

        def run_and_inflate(module: ModuleType) -> None:
            run(module)
            _inflate(module)

        loader.exec_module = run_and_inflate  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _PatchOnImport())
