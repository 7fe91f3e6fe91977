"""One PNG of ``quantact bench`` results: achieved throughput as a fraction of the hardware ceiling
measured in the same run, for quantact and its peers.

- producers: effective bandwidth (``*_tb_s``) / device-to-device copy bandwidth;
- consumers: roofline time / time, the roofline from the copy bandwidth (weights + activations + output
  bytes) and the fp8 GEMM rate of ``torch._scaled_mm`` at 8192^3 (both from the other runs; without
  them, the best rate measured in the consumer run is the ceiling);
- MLP block: roofline time / time.

Needs matplotlib (``pip install quantact[bench]``); :func:`plot` returns False without it.
"""

from __future__ import annotations

from typing import Any


def _bars(ax: Any, title: str, groups: list[tuple[str, dict[str, float]]]) -> None:
    """Grouped horizontal bars: one group per case, one bar per implementation (fractions of 1)."""
    names = sorted({n for _, vals in groups for n in vals}, key=lambda n: (not n.startswith("quantact"), n))
    height = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        ys = [i + j * height for i in range(len(groups))]
        ax.barh(ys, [vals.get(name, 0.0) for _, vals in groups], height=height, label=name)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(groups))], [g for g, _ in groups], fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("fraction of ceiling")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))


def plot(results: dict[str, Any], path: str) -> bool:
    """Write the figure for the sections present in ``results`` (``producers``, ``consumers``,
    ``block``: the JSON objects of the three benchmarks). Returns False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = []
    prod = results.get("producers")
    if prod and prod.get("copy_tb_s"):
        panels.append(("producers: TB/s / copy bandwidth", [
            (f"{c['name']} {'x'.join(map(str, c['shape']))}",
             {k[:-5]: v / prod["copy_tb_s"] for k, v in c.items() if k.endswith("_tb_s")})
            for c in prod["cases"]]))
    block = results.get("block")
    ceil = (block or {}).get("ceilings") or {}
    peak = ceil.get("fp8_flops_per_s")
    copy = ceil.get("copy_bytes_per_s") or (prod or {}).get("copy_tb_s", 0) * 1e12
    cons = results.get("consumers")
    if cons and cons.get("cases"):
        rates = [{k[:-7]: v * 1e12 for k, v in c.items() if k.endswith("_tflops") and isinstance(v, (int, float))}
                 for c in cons["cases"]]
        groups = []
        for c, r in zip(cons["cases"], rates):
            m, n, k = c["shape"]
            flops = 2 * m * n * k
            roof = max((n * k + m * k + 2 * m * n) / copy, flops / peak) if peak and copy else \
                flops / max(v for rr in rates for v in rr.values())
            groups.append((f"{m}x{n}x{k}", {name: roof * v / flops for name, v in r.items()}))
        panels.append(("consumers: roofline time / time" if peak and copy else
                       "consumers: TFLOP/s / best measured", groups))
    if block and any("of_roofline" in c for c in block["cases"]):
        panels.append(("MLP block: roofline time / time", [
            (f"M={c['m']} H={c['hidden']} I={c['intermediate']}", c["of_roofline"])
            for c in block["cases"] if "of_roofline" in c]))
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
    for ax, (title, groups) in zip(axes[:, 0], panels):
        _bars(ax, title, groups)
    fig.suptitle(f"quantact bench on {results.get('device', '?')} ({results.get('date', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


__all__ = ["plot"]
