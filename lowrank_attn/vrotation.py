"""Pure math: the basis cached values are quantised in (``Recipe.v_rotation``; DESIGN §12).

Values are quantised per token over groups of channels (KIVI), so one token's error grows with the spread of
its channels: a few large channels set the step for all of them. An orthonormal rotation R before the
quantiser (and Rᵀ after attention, in front of ``o_proj``) changes nothing without quantisation and spreads
each token's energy evenly over the channels (QuaRot's Hadamard). Rotating in the *output* basis of ``vfit``
first — E = U_rᵀ M^{1/2}, where a unit of error costs the same in what ``o_proj`` sees — puts the quantiser's
roughly isotropic error where it is cheapest. So a rotation is a pair of maps per KV head:

    enc = R E  (r × d, what the cache stores: v' = enc v)      dec = D Rᵀ  (d × r, in front of o_proj)

with E, D the value fit's first r components (E = D = I at full rank without a fit), and R the orthonormal
Hadamard of size r (block-diagonal Hadamard blocks of the largest power of two dividing r otherwise).
Measured by held-out next-token KL at the same bytes: eval/results/kv/FIDELITY.md (``eval/kv_fidelity.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix of size ``n`` (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard matrix needs a power-of-two size, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def spreading(n: int) -> np.ndarray:
    """(n, n) orthonormal: the Hadamard of size n, or blocks of the largest power of two dividing n."""
    block = n & -n  # the largest power of two dividing n
    return np.kron(np.eye(n // block), hadamard(block))


@dataclass(frozen=True)
class Rotation:
    name: str
    needs_fit: bool  # needs the value fit (``vfit.ValueFit``) even at full value rank
    rotate: bool  # applies ``spreading`` before the quantiser
    doc: str


ROTATIONS = {r.name: r for r in (
    Rotation("none", False, False, "values quantised as they are"),
    Rotation("hadamard", False, True, "a Hadamard rotation per KV head (data-free, QuaRot-style)"),
    Rotation("output", True, True, "the closed-form output basis of the value fit (what o_proj sees), then "
                                    "a Hadamard rotation"),
)}


def value_maps(rotation: str, fit, rank: int, head_dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(enc (r, d), dec (d, r)) for one KV head, or None where values are cached as they are (full rank, no
    rotation). ``fit``: the head's ``vfit.ValueFit`` (needed below full rank and for ``output``)."""
    rot = ROTATIONS[rotation]
    if rank < head_dim or rot.needs_fit:
        if fit is None:
            raise ValueError(f"value rotation {rotation!r} at rank {rank} needs the value fit")
        enc, dec = fit.enc[:rank], fit.dec[:, :rank]
    elif not rot.rotate:
        return None
    else:
        enc = dec = np.eye(head_dim)
    if rot.rotate:
        r = spreading(rank)
        enc, dec = r @ enc, dec @ r.T
    return enc, dec

