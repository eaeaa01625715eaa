"""PNG plots for the benchmarks' JSON (matplotlib, no display needed).

    python -m benchmarks.plots benchmarks/out/offline.json   # writes offline.png beside it
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_offline(result: dict, path: Path) -> None:
    """Throughput against the number of distinct adapters (one line per popularity law), the peers as
    horizontal lines."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    runs = [r for r in result["runs"] if not r.get("prefix_caching")]
    cached = [r for r in result["runs"] if r.get("prefix_caching") and r["adapters"] > 0]
    base = next((r["tok_s"] for r in runs if r["adapters"] == 0), None)
    one = next((r for r in runs if r["adapters"] == 1), None)
    for law in sorted({r["law"] for r in runs if r["adapters"] > 1}):
        points = ([one] if one else []) + [r for r in runs if r["law"] == law]
        ax.plot([r["adapters"] for r in points], [r["tok_s"] for r in points], marker="o", label=f"Quiver, {law} popularity")
    if cached:
        ax.plot([r["adapters"] for r in cached], [r["tok_s"] for r in cached], linestyle=":", marker="x", color="tab:green",
                label="Quiver with prefix caching (shared system prompt)")
    b = result["baselines"]
    lines = [(base, "Quiver, base model", "black")]
    if b:
        lines += [(b["hf_static"]["tok_s"], "transformers static, no adapters", "gray"),
                  (b["peft_mixed"]["tok_s"], f"PEFT mixed batches ({b['peft_mixed']['adapters']} adapters)", "tab:red"),
                  (b["merge_and_swap"]["tok_s"], f"merge and swap ({b['merge_and_swap']['adapters']} adapters)", "tab:purple")]
    for value, label, color in lines:
        if value:
            ax.axhline(value, linestyle="--", color=color, linewidth=1, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct LoRA adapters (ranks 8-64, q/v projections)")
    ax.set_ylabel("output tokens / s")
    gpu = result.get("machine", {}).get("gpu")
    ax.set_title(f"{result['model']} ({result['dtype'].replace('torch.', '')}) on {gpu or 'CPU'}: "
                 f"{result['requests']} requests ({result.get('data', 'random')}), "
                 f"{result['output_tokens_min_max_sum'][2]:,} output tokens", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        plot_offline(json.loads(Path(arg).read_text()), Path(arg).with_suffix(".png"))
