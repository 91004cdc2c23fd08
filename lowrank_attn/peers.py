"""What users already have, run as they run it: transformers' ``QuantizedCache`` (KIVI-style K and V quantisation
with a full-precision residual window) through its quanto and HQQ backends, each registered by name.

    cache = make_cache("quanto-4bit", model)          # a fresh cache for one sequence
    model(input_ids=..., past_key_values=cache)       # or model.generate(..., past_key_values=cache)

Settings are transformers' defaults (``q_group_size`` 64, ``residual_length`` 128, ``axis_key``/``axis_value``
0), i.e. ``generate(..., cache_implementation="quantized", cache_config={"backend": B, "nbits": N})``; the
``-kivi`` peers change one setting, ``axis_key=-1``: keys quantised per channel over groups of 64 tokens, as KIVI
does (quanto's ``axis=0`` groups each token's channels, which outlier key channels — Qwen2.5's — ruin), values
still per token. One 2048-token WikiText-2 window through the cache, float32: Qwen2.5-Coder-0.5B quanto 4-bit
+11.5% with the defaults, −0.5% with ``axis_key=-1``; SmolLM2-135M +1.9% / +0.4%; HQQ is best at its defaults
(axis 1: +13% on Qwen2.5). A user who knows KIVI sets it, so it is the stronger peer to beat.
A backend that is not installed is one clear error (``pip install optimum-quanto`` / ``hqq``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from .errors import LowrankAttnError


class PeerUnavailableError(LowrankAttnError, RuntimeError):
    """A peer method whose package is not installed."""


def installed(module: str) -> bool:
    """Whether ``module`` (dotted names too) can be imported; ``find_spec("a.b")`` raises when ``a`` is missing."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@dataclass(frozen=True)
class QuantizedCachePeer:
    backend: str  # "quanto" | "hqq"
    nbits: int
    package: str  # the import name that must be installed
    pip_name: str
    axis_key: int = 0  # transformers' default; -1 (quanto): per-channel key groups over tokens, KIVI's layout

    def cache(self, model):
        if not installed(self.package):
            raise PeerUnavailableError(f"transformers' QuantizedCache with the {self.backend} backend needs "
                                       f"{self.pip_name}: pip install {self.pip_name}")
        from transformers import QuantizedCache

        return QuantizedCache(backend=self.backend, config=model.config, nbits=self.nbits, axis_key=self.axis_key)


PEERS: dict[str, QuantizedCachePeer] = {
    "quanto-4bit": QuantizedCachePeer("quanto", 4, "optimum.quanto", "optimum-quanto"),
    "quanto-2bit": QuantizedCachePeer("quanto", 2, "optimum.quanto", "optimum-quanto"),
    "quanto-4bit-kivi": QuantizedCachePeer("quanto", 4, "optimum.quanto", "optimum-quanto", axis_key=-1),
    "quanto-2bit-kivi": QuantizedCachePeer("quanto", 2, "optimum.quanto", "optimum-quanto", axis_key=-1),
    "hqq-4bit": QuantizedCachePeer("hqq", 4, "hqq", "hqq"),
    "hqq-2bit": QuantizedCachePeer("hqq", 2, "hqq", "hqq"),
}


def make_cache(name: str, model):
    """A fresh transformers cache of peer ``name`` for ``model``."""
    if name not in PEERS:
        raise PeerUnavailableError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    return PEERS[name].cache(model)
