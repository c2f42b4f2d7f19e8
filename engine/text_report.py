"""Plain-text reports for the terminal: number/byte formatting, aligned tables, the inspect report.

Functions return lines; only the CLI prints them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from engine.model_stats import ModelStats, top_costs


def human_count(value: float, unit: str = "") -> str:
    """1234567 -> '1.23 M' (with ``unit`` appended: '1.23 MFLOPs')."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def human_bytes(value: float) -> str:
    """Decimal units: 1234567 -> '1.23 MB'."""
    return human_count(value, "B") if value >= 1000 else f"{value:.0f} B"


def text_table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    """Rows as aligned text lines; columns whose index is in ``right`` are right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def short_list(names: Sequence[str], limit: int = 5) -> str:
    """'a, b, c, ... (7 more)'; unnamed nodes are counted rather than listed."""
    named = [n for n in names if n and n != "<unnamed>"]
    unnamed = len(names) - len(named)
    parts = named[:limit]
    if len(named) > limit:
        parts.append(f"... ({len(named) - limit} more)")
    if unnamed:
        parts.append(f"{unnamed} unnamed")
    return ", ".join(parts)


def format_stats(stats: ModelStats) -> list[str]:
    """The text report of ``gie inspect`` (lines, without printing them)."""
    opsets = ", ".join(f"{domain} {version}" for domain, version in stats.opset_imports.items())
    lines = [
        f"model:       {stats.source}",
        f"ir version:  {stats.ir_version}   opsets: {opsets}   producer: {stats.producer or '?'}",
        "",
        "inputs:",
        *[f"  {v.name}: {v.dtype}{v.shape_text()}" for v in stats.inputs],
        "outputs:",
        *[f"  {v.name}: {v.dtype}{v.shape_text()}" for v in stats.outputs],
        "",
        f"nodes: {stats.node_count} ({len(stats.op_counts)} op types)",
    ]
    rows = [[op, str(count)] for op, count in stats.op_counts.items()]
    lines += ["  " + line for line in text_table(rows, right=(1,))] if rows else []
    lines += [
        "",
        f"parameters:  {human_count(stats.parameter_count)} "
        f"({stats.parameter_count:,} in {stats.initializer_count} initializers, "
        f"{human_bytes(stats.parameter_bytes)})",
        *(
            [
                f"             + {human_count(stats.folded_parameter_count)} computed from "
                f"constants ({stats.folded_parameter_count:,}, "
                f"{human_bytes(stats.folded_parameter_bytes)}; e.g. ConstantOfShape weights)"
            ]
            if stats.folded_parameter_count
            else []
        ),
        f"compute:     {human_count(stats.flops, 'FLOPs')} ({stats.flops:,} FLOPs)",
        f"memory:      {human_bytes(stats.bytes_read)} read, "
        f"{human_bytes(stats.bytes_written)} written (unfused)",
    ]
    unknown = stats.cost_unknown
    if unknown:
        groups = Counter((row.op_type, row.category) for row in unknown)
        listed = ", ".join(f"{op} x{count} ({why})" for (op, why), count in groups.items())
        lines.append(f"cost unknown: {len(unknown)} node(s) not counted: {listed}")
        if any(why == "dynamic shape" for _, why in groups):
            lines.append("  (bind symbolic dims with --dim NAME=VALUE)")
    heaviest = [row for row in top_costs(stats, 5) if row.flops]
    if heaviest:
        lines.append("heaviest nodes:")
        total = stats.flops
        rows = [
            [row.name, row.op_type, human_count(row.flops, "FLOPs"), f"{row.flops / total:.1%}"]
            for row in heaviest
        ]
        lines += ["  " + line for line in text_table(rows, right=(2, 3))]
    lines.append("")
    if stats.unsupported_ops:
        lines.append("unsupported ops (no reference kernel):")
        for op in stats.unsupported_ops:
            lines.append(f"  {op.qualified_name} x{op.count}: {short_list(list(op.node_names))}")
    else:
        lines.append("unsupported ops: none")
    return lines
