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
(axis 1: +13% on Qwen2.5). The stronger peer where it runs; it cannot take a prompt of any length (``any_length``).
A backend that is not installed is one clear error (``pip install optimum-quanto`` / ``hqq``), and so is a model with
sliding-window layers (Gemma-2/3, Mistral): ``QuantizedCache`` takes only models whose every layer attends fully
(``check_model``).
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

    @property
    def any_length(self) -> bool:
        """Whether it takes a sequence of any length: quanto's key groups over tokens (axis_key=-1) need batch × KV
        heads × tokens in whole groups of 64 at every quantisation, which a prompt of any length breaks."""
        return self.axis_key == 0

    def cache(self, model):
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


def check_peer(name: str, *, any_length: bool = False) -> QuantizedCachePeer:
    """Peer ``name``, known and its backend installed; ``any_length``: one that generates from prompts of any length
    (RULER, lm-eval), not only through the cache in whole groups. Anything else is one line."""
    peer = PEERS.get(name)
    if peer is None:
        raise PeerUnavailableError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    if any_length and not peer.any_length:
        raise PeerUnavailableError(f"{name} cannot generate from prompts of any length (quanto's per-channel key groups "
                                   "need batch x KV heads x tokens in whole groups of 64): use it through the cache "
                                   "(eval --task cache-ppl, eval/kv_total.py)")
    if not installed(peer.package):
        raise PeerUnavailableError(f"{name} needs the {peer.backend} backend of transformers' QuantizedCache: pip install "
                                   f"{peer.pip_name}")
    return peer


def check_model(name: str, model) -> None:
    """One line where peer ``name`` cannot run on ``model``: transformers' ``QuantizedCache`` takes only models whose
    every layer attends fully (it refuses sliding-window layers, which our cache keeps)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = model.config.get_text_config(decoder=True)
    other = sorted(set(get_layer_types_and_kwargs(config)[0]) - {"full_attention"})
    if other:
        raise PeerUnavailableError(f"{name}: transformers' QuantizedCache runs only on models whose every layer attends "
                                   f"fully; {getattr(config, 'model_type', 'this model')} has {', '.join(other)} layers")


def make_cache(name: str, model):
    """A fresh transformers cache of peer ``name`` for ``model`` (``check_peer`` and ``check_model`` first)."""
    peer = check_peer(name)
    check_model(name, model)
    return peer.cache(model)
