"""Paper Fig. 2: average attention maps of the first layers, and the share of attention that lands on the first
token in every layer. The picture that explains why sinks exist."""

from __future__ import annotations

import torch

from .context import Context
from .report import Report, figure, table


@torch.no_grad()
def attention_probs(model, ids: list[int]) -> list[torch.Tensor]:
    """Each layer's attention probabilities (H, T, T) for one plain causal forward of ``ids``."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the only implementation that returns probabilities
    try:
        out = model(input_ids=torch.tensor([ids]), output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return [a[0].float() for a in out.attentions]


def attention_map(ctx: Context) -> Report:
    segments, seg_len, long_len, skip = (4, 16, 128, 8) if ctx.quick else (64, 16, 1024, 16)
    ids = ctx.text_ids(max(segments * seg_len, long_len))
    # Maps: the paper averages many short sequences; each starts fresh, so its token 0 is a segment start.
    maps = None
    for s in range(segments):
        probs = attention_probs(ctx.model, ids[s * seg_len : (s + 1) * seg_len])  # L x (H, T, T)
        mean = torch.stack([p.mean(0) for p in probs])  # (L, T, T)
        maps = mean if maps is None else maps + mean
    assert maps is not None, "at least one segment"
    maps /= segments
    # Shares: one longer sequence, queries past the first ``skip`` tokens, averaged over heads and queries.
    probs = attention_probs(ctx.model, ids[:long_len])
    rows = []
    for layer, p in enumerate(probs):  # (H, T, T)
        q = p[:, skip:]  # (H, T-skip, T)
        rows.append(
            (layer, float(q[..., 0].mean()), float(q[..., :4].sum(-1).mean()), float(q[..., -1:].mean()))
        )
    shown = sorted({0, 1, 2, len(probs) // 2, len(probs) - 1} & set(range(len(probs))))
    fig, axes = figure(1, len(shown) + 1, size=(3.2 * (len(shown) + 1), 3.4))
    for ax, layer in zip(axes[0], shown, strict=False):
        ax.imshow(maps[layer].clamp(min=1e-3).log10(), cmap="viridis", vmin=-3, vmax=0)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    bar = axes[0, -1]
    bar.bar([r[0] for r in rows], [r[1] for r in rows], color="tab:red")
    bar.set_ylim(0, 1)
    bar.set_xlabel("layer")
    bar.set_title(f"share of attention on token 0\n(queries {skip}..{long_len - 1})", fontsize=9)
    fig.suptitle(f"{ctx.model_name}: mean attention (log10) over {segments} sequences of {seg_len} tokens")
    report = Report(
        "attention-map",
        f"Attention maps and the share on the first token ({ctx.model_name})",
        ctx.command,
        ("layer", "share_token0", "share_first4", "share_self"),
        [(r[0], f"{r[1]:.5f}", f"{r[2]:.5f}", f"{r[3]:.5f}") for r in rows],
    )
    above = sum(1 for r in rows if r[1] > 0.5)
    report.sections.append(
        f"Token 0 takes over half of the attention in {above} of {len(rows)} layers (queries {skip} to "
        f"{long_len - 1} of one {long_len}-token text, mean over heads and queries)."
    )
    report.sections.append(
        table(("layer", "share on token 0", "share on tokens 0-3", "share on itself"), rows)
    )
    report.figure = fig
    return report
