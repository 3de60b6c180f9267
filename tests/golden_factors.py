"""Golden factorizations: fixed-seed problems whose factors a refactor must not change.

``python tests/golden_factors.py`` rewrites ``tests/data/golden_factors.pt`` from the current
code; do that only with a change that is meant to change the factors, and say why in its commit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

GOLDEN_PATH = Path(__file__).parent / "data" / "golden_factors.pt"


def _problem(out: int, fan_in: int, seed: int, with_gram: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    # low rank plus noise, like a trained layer; inputs with uneven feature norms
    low_rank = torch.randn(out, 6, generator=g) @ torch.randn(6, fan_in, generator=g)
    w = low_rank + 0.3 * torch.randn(out, fan_in, generator=g)
    if not with_gram:
        return w, None
    x = torch.randn(4 * fan_in, fan_in, generator=g) * torch.linspace(0.2, 2.0, fan_in)
    return w, x.T @ x / x.shape[0]


def cases() -> list[tuple[str, str, int, int, float, bool, dict[str, Any]]]:
    """``(case id, method, out, fan_in, density, with_gram, options)``."""
    return [
        ("dsf-vision-wide", "dsf", 24, 40, 0.3, False, {}),
        ("dsf-vision-tall", "dsf", 40, 24, 0.3, False, {}),
        ("dsf-vision-conv", "dsf", 16, 144, 0.2, True, {}),
        ("dsf-llm-square", "dsf", 32, 32, 0.5, True, {"preset": "llm"}),
        ("dsf-llm-tall", "dsf", 48, 32, 0.4, True, {"preset": "llm"}),
        ("dsf-fixed-mask", "dsf", 32, 48, 0.4, True, {"preset": "llm", "fixed_mask": True}),
        ("magnitude", "magnitude", 24, 40, 0.3, True, {}),
        ("wanda", "wanda", 24, 40, 0.3, True, {}),
        ("admm", "admm", 24, 40, 0.3, True, {}),
        ("svd", "svd", 24, 40, 0.5, True, {}),
        ("admm-per-row", "admm", 24, 40, 0.3, True, {"per_row": True}),
        ("sparsegpt", "sparsegpt", 24, 300, 0.3, True, {}),
    ]


def compute() -> dict[str, dict[str, torch.Tensor | None]]:
    """Every case's factors and masks from the current code, on one thread (the reduction order
    of a matrix product depends on the thread count)."""
    from dsf_lightning.factorization import factorize

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict[str, dict[str, torch.Tensor | None]] = {}
    for seed, (case, method, rows, cols, density, with_gram, opts) in enumerate(cases()):
        w, gram = _problem(rows, cols, seed, with_gram)
        fac = factorize(method, w, density, gram, **opts)
        out[case] = {k: getattr(fac, k) for k in ("first", "second", "first_mask", "second_mask")}
    torch.set_num_threads(threads)
    return out


if __name__ == "__main__":
    GOLDEN_PATH.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cpu_capability": torch.backends.cpu.get_cpu_capability(), "factors": compute()}, GOLDEN_PATH)
    print(f"wrote {GOLDEN_PATH}")
