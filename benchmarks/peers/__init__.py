"""Re-implementations of the peers' routing policies, for ``benchmarks/compare_policies.py``.

Each module registers its policy (``cacheroute.policies.register_policy``) when imported,
so ``cacheroute simulate --plugin benchmarks/peers/<x>.py`` can load one by file path.
None is registered by ``import cacheroute``. Every algorithm is written from the peers'
published descriptions and documentation (``../shared/design.md`` section 1; each module's
docstring says what was taken from where and what had to be approximated); no peer code
is copied.

| name | peer | module |
|---|---|---|
| ``dynamo`` | NVIDIA Dynamo KV router, approximate (TTL) index | ``dynamo.py`` |
| ``llmd`` | llm-d optimized baseline (prefix-affinity filter + token-load scorer) | ``llmd.py`` |
| ``llmd_scorers`` | llm-d / GIE weighted scorers (prefix 3, queue 1, KV 1) | ``llmd.py`` |
| ``ray`` | Ray Serve ``PrefixCacheAffinityRouter`` | ``ray_serve.py`` |
| ``vllm_router`` | vLLM production-stack prefix-aware router | ``vllm_router.py`` |
| ``sglang`` | SGLang cache_aware with SGLang's defaults | ``sglang.py`` |
| ``kubeai`` | KubeAI ``PrefixHash`` (CHWBL) | ``kubeai.py`` |
| ``preble`` | Preble E2 (exploit / explore, windowed load) | ``preble.py`` |
"""

from __future__ import annotations

import importlib

MODULES = ("dynamo", "llmd", "ray_serve", "vllm_router", "sglang", "kubeai", "preble")
"""The peer modules, in the order of the table above."""

NAMES = ("dynamo", "llmd", "llmd_scorers", "ray", "vllm_router", "sglang", "kubeai", "preble")
"""The registry names they add."""


def register_all() -> tuple[str, ...]:
    """Import every peer module (each registers its policies); return :data:`NAMES`."""
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}")
    return NAMES
