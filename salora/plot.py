"""Bar charts of refusal rates across evaluation runs (people would rather see than read them)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from salora.errors import SaLoRAError  # noqa: E402


def plot_refusal_rates(results: list[str | Path], out: str | Path) -> list[tuple[str, float, int]]:
    """One bar per `salora eval` result file; returns (label, refusal_rate, n) rows."""
    rows = []
    for path in results:
        try:
            data = json.loads(Path(path).read_text())
            rows.append((str(data.get("label") or Path(path).stem), float(data["refusal_rate"]), int(data["n"])))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SaLoRAError(f"{path}: not a `salora eval` result ({e})") from e
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(rows)), 3.5))
    bars = ax.bar([r[0] for r in rows], [100 * r[1] for r in rows], color="#4C72B0")
    ax.bar_label(bars, labels=[f"{100 * r[1]:.1f}%\nn={r[2]}" for r in rows], fontsize=8)
    ax.set_ylabel("refusal rate (%)")
    ax.set_ylim(0, 115)
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return rows
