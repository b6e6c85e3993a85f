"""The torch modules hls4ml converts (a selector's linear maps, block-diagonal over the KV
heads) and hls4ml's numerical profiling of them."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np

from ...errors import InputError, NoDeviceError


def _torch():
    import torch

    return torch


def linear_map(weight: Any) -> Any:
    """The torch module of one map: y = x @ weight (weight [n_in, n_out]), a bias-free
    nn.Linear named `proj` (hls4ml's layer name)."""
    torch = _torch()

    class LinearMap(torch.nn.Module):
        def __init__(self, w: Any) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(w.shape[0], w.shape[1], bias=False)
            with torch.no_grad():
                self.proj.weight.copy_(torch.as_tensor(w, dtype=torch.float32).T)

        def forward(self, x: Any) -> Any:
            return self.proj(x)

    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or 0 in w.shape:
        raise InputError("weight", f"expected [n_in, n_out], got shape {w.shape}")
    if not np.isfinite(w).all():
        raise InputError("weight", "holds NaN or Inf")
    return LinearMap(w).eval()


def block_diagonal(w: Any) -> np.ndarray:
    """[H, n_in, n_out] -> [H*n_in, H*n_out], head h's block on the diagonal."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 3:
        raise InputError("weight", f"expected [heads, n_in, n_out], got shape {w.shape}")
    h, n_in, n_out = w.shape
    out = np.zeros((h * n_in, h * n_out))
    for i in range(h):
        out[i * n_in : (i + 1) * n_in, i * n_out : (i + 1) * n_out] = w[i]
    return out


def seer_maps(wq: Any, wk: Any) -> dict[str, np.ndarray]:
    """The AttnGate's maps as [n_in, n_out] weights over every KV head (block-diagonal)."""
    return {"key": block_diagonal(_np(wk)), "query": block_diagonal(_np(wq))}


def dsa_maps(wq: Any, wk: Any) -> dict[str, np.ndarray]:
    """The lightning indexer's maps: keys [F, Di], queries [Fq, H*Di]."""
    return {"key": _np(wk).astype(np.float64), "query": _np(wq).astype(np.float64)}


def _np(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu().double().numpy()
    return np.asarray(t, dtype=np.float64)


def profiling_missing() -> str | None:
    """Why hls4ml's numerical profiling cannot run here (it needs pandas, seaborn), or None."""
    try:
        import hls4ml.model.profiling  # noqa: F401
    except ImportError as exc:
        return f"hls4ml's profiling needs {exc.name} (pip install 'hls4ml[profiling]')"
    return None


def profile(weight: Any, x: Any) -> dict[str, float]:
    """Peaks (largest |value|) of one map's input, weight and result on calibration inputs
    x [N, n_in], by hls4ml's numerical profiling (boxplot summaries, `whishi`)."""
    reason = profiling_missing()
    if reason:
        raise NoDeviceError(reason)
    from hls4ml.model.profiling import activations_torch, array_to_summary, weights_torch

    model = linear_map(weight).float()
    x = np.asarray(x, dtype=np.float32)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints each layer's name
        weights = weights_torch(model, fmt="summary", plot="boxplot")
        acts = activations_torch(model, x, fmt="summary", plot="boxplot")
    magnitudes = np.abs(x[x != 0])
    if magnitudes.size == 0:
        raise InputError("x", "is all zeros: nothing to profile")
    inputs = array_to_summary(magnitudes, fmt="boxplot")
    w = [s for s in weights if s["weight"].endswith("/w")]
    if len(w) != 1 or len(acts) != 1:
        raise InputError("weight", "expected one Dense layer in the profile")
    return {
        "input": float(inputs["whishi"]),
        "weight": float(w[0]["whishi"]),
        "result": float(acts[0]["whishi"]),
    }
