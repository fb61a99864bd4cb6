"""Orthogonal matrices for rotations: randomized Hadamard where one exists, else random orthogonal.

A Hadamard matrix of order n (entries ±1, ``H Hᵀ = n I``) scaled by 1/√n spreads any single outlier
channel evenly over all n. Orders built here:

- 2^k by Sylvester's doubling;
- m · 2^k for a base order m from Paley's constructions: Paley I for a prime q ≡ 3 (mod 4) gives
  order q + 1 (12, 20, 60, 108, 140, ...), Paley II for a prime power q ≡ 1 (mod 4) gives
  2(q + 1) (28, 36, 52 over GF(25), ...), and 40 = 2 · 20;
- anything else (and 156, 172, which need Williamson-type constructions) falls back to a seeded
  random orthogonal matrix (QR of a Gaussian matrix), which rotates just as exactly but spreads
  outliers less evenly.

Every matrix gets seeded random sign flips on its rows, so that two layers never share one.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from onnxq.core.errors import OnnxqError

#: base orders beyond powers of two that :func:`hadamard_parts` builds exactly
BASE_ORDERS = (12, 20, 28, 36, 40, 52, 60, 108, 140)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def _prime_power(q: int) -> tuple[int, int] | None:
    for p in range(2, q + 1):
        if q % p == 0:
            k, r = 0, q
            while r % p == 0:
                r //= p
                k += 1
            return (p, k) if r == 1 and _is_prime(p) else None
    return None


class _Field:
    """GF(p^k) elements as integer codes 0..q-1, enough for quadratic characters (k <= 2)."""

    def __init__(self, p: int, k: int) -> None:
        self.p, self.k, self.q = p, k, p**k
        self.poly: tuple[int, int] | None = None
        if k == 2:  # x^2 = a x + b, irreducible: no root in GF(p)
            for a in range(p):
                for b in range(1, p):
                    if all((x * x - a * x - b) % p for x in range(p)):
                        self.poly = (a, b)
                        break
                if self.poly:
                    break
        elif k != 1:
            raise ValueError("only prime fields and their quadratic extensions are needed")

    def elems(self) -> list[tuple[int, int]]:
        return [(i % self.p, i // self.p) for i in range(self.q)] if self.k == 2 else [(i, 0) for i in range(self.q)]

    def sub(self, u: tuple[int, int], v: tuple[int, int]) -> tuple[int, int]:
        return ((u[0] - v[0]) % self.p, (u[1] - v[1]) % self.p)

    def mul(self, u: tuple[int, int], v: tuple[int, int]) -> tuple[int, int]:
        if self.k == 1:
            return ((u[0] * v[0]) % self.p, 0)
        assert self.poly is not None
        a, b = self.poly
        c0 = u[0] * v[0]
        c1 = u[0] * v[1] + u[1] * v[0]
        c2 = u[1] * v[1]  # x^2 -> a x + b
        return ((c0 + c2 * b) % self.p, (c1 + c2 * a) % self.p)

    def chi(self) -> dict[tuple[int, int], int]:
        """Quadratic character: 0 at 0, +1 on squares, -1 elsewhere."""
        squares = {self.mul(e, e) for e in self.elems() if e != (0, 0)}
        return {e: 0 if e == (0, 0) else (1 if e in squares else -1) for e in self.elems()}


def _jacobsthal(q: int) -> np.ndarray:
    pk = _prime_power(q)
    assert pk is not None
    if pk[1] == 1:  # prime field: vectorised quadratic character of (a - b) mod q
        chi = -np.ones(q, dtype=np.int64)
        chi[(np.arange(1, q) ** 2) % q] = 1
        chi[0] = 0
        idx = np.arange(q)
        return chi[(idx[:, None] - idx[None, :]) % q]
    field = _Field(*pk)
    elems = field.elems()
    chi = field.chi()
    return np.array([[chi[field.sub(a, b)] for b in elems] for a in elems], dtype=np.int64)


def _paley1(q: int) -> np.ndarray:
    """Order q + 1 for q ≡ 3 (mod 4)."""
    Q = _jacobsthal(q)
    n = q + 1
    S = np.zeros((n, n), dtype=np.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return S + np.eye(n, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
    """Order 2(q + 1) for q ≡ 1 (mod 4)."""
    Q = _jacobsthal(q)
    n = q + 1
    C = np.zeros((n, n), dtype=np.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    plus = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    minus = np.array([[1, 1], [1, -1]], dtype=np.int64)
    out = np.zeros((2 * n, 2 * n), dtype=np.int64)
    for i in range(n):
        for j in range(n):
            block = minus if i == j else (plus if C[i, j] == 1 else -plus)
            out[2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = block
    return out


@cache
def _base(m: int) -> np.ndarray | None:
    """An exact ±1 Hadamard matrix of order m, or None if no construction here covers m."""
    if m == 1:
        return np.ones((1, 1), dtype=np.int64)
    if m == 2:
        return np.array([[1, 1], [1, -1]], dtype=np.int64)
    if m % 4:
        return None
    q = m - 1
    pk = _prime_power(q)
    if pk and q % 4 == 3 and pk[1] <= 2:
        return _paley1(q)
    q = m // 2 - 1
    pk = _prime_power(q)
    if pk and q % 4 == 1 and pk[1] <= 2:
        return _paley2(q)
    if m % 2 == 0 and _base(m // 2) is not None:
        half = _base(m // 2)
        assert half is not None
        return np.kron(np.array([[1, 1], [1, -1]], dtype=np.int64), half)
    return None


def hadamard_parts(n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Two ±1 Hadamard matrices (A, B) with A ⊗ B of order n: a base order times a power of two, or None.

    For a power of two the Sylvester matrix is split into two halves (H_{2^a} ⊗ H_{2^b} = H_{2^(a+b)}), so
    a run-time rotation can be applied as two small MatMuls instead of one n x n MatMul.
    """
    power = 1
    while n % (power * 2) == 0:
        power *= 2
    # try the largest power of two first, then hand factors of two to the base
    p = power
    while p >= 1:
        base = _base(n // p)
        if base is not None:
            if base.shape[0] == 1 and p > 1:  # pure power of two: balance the two factors
                q = 1
                while q * q < p:
                    q *= 2
                base, p = _sylvester(q), p // q
            return base, _sylvester(p)
        p //= 2
    return None


def _sylvester(p: int) -> np.ndarray:
    out = np.ones((1, 1), dtype=np.int64)
    while out.shape[0] < p:
        out = np.kron(np.array([[1, 1], [1, -1]], dtype=np.int64), out)
    return out


def hadamard_order(n: int) -> np.ndarray | None:
    """A ±1 Hadamard matrix of order n built as H_m ⊗ H_{2^k}, or None."""
    parts = hadamard_parts(n)
    return None if parts is None else np.kron(*parts)


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    """A seeded random orthogonal matrix (Haar measure via QR with sign correction)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    q, r = np.linalg.qr(a)
    return (q * np.sign(np.diag(r))).astype(np.float64)


def rotation(n: int, seed: int, kind: str = "hadamard") -> tuple[np.ndarray, str]:
    """An n×n orthogonal matrix and what it is (``"hadamard"`` or ``"random"``), float64.

    ``hadamard``: randomized Hadamard ``diag(s) H / √n`` (s: seeded random signs), falling back
    to random orthogonal where no Hadamard matrix of order n is built here.
    """
    if n < 1:
        raise OnnxqError(f"cannot build a rotation of size {n}", "check the model's hidden size")
    if kind == "hadamard":
        h = hadamard_order(n)
        if h is not None:
            signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
            return signs[:, None] * h / np.sqrt(n), "hadamard"
    elif kind != "random":
        raise OnnxqError(f"unknown rotation kind {kind!r}", "use hadamard or random")
    return random_orthogonal(n, seed), "random"


def hadamard_factors(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`rotation`'s Hadamard as ``(d, A, B)``: ``rotation(n, seed)[0] == diag(d) (A ⊗ B)``.

    ``d`` holds the seeded signs over √n; ``A`` and ``B`` are the ±1 factors of :func:`hadamard_parts`.
    None where :func:`rotation` falls back to a random orthogonal matrix.
    """
    parts = hadamard_parts(n)
    if parts is None:
        return None
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
    return signs / np.sqrt(n), parts[0].astype(np.float64), parts[1].astype(np.float64)


def check_orthogonal(matrix: np.ndarray, n: int, what: str) -> np.ndarray:
    """Validate a caller's rotation (learned ones come through here): square n×n and orthogonal."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (n, n):
        raise OnnxqError(
            f"{what} is {m.shape[0]}x{m.shape[1] if m.ndim > 1 else ''}, the model needs {n}x{n}",
            "pass a rotation of the model's size",
        )
    err = float(np.abs(m @ m.T - np.eye(n)).max())
    if err > 1e-4:
        raise OnnxqError(f"{what} is not orthogonal (max |R Rᵀ - I| = {err:.2g})", "orthonormalize it (e.g. QR)")
    return m
