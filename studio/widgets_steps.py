"""The step scrubber: a slider over the recorded steps and the diff of the last applied one.

Position ``k`` means ``k`` steps are applied (0 = the original graph); the text shows step
``k - 1``, the one that produced the graph on screen: its pass and rule, the nodes it removed
and added, where every added node came from, and the estimated cost before and after.
"""

from __future__ import annotations

from typing import Any

import ipywidgets

from engine.passes.step import Step
from studio.widgets_base import escaped


def step_diff_text(step: Step) -> str:
    """Plain-text diff of one step: rule, removed -> added, provenance, cost change."""
    label = step.pass_name + (f" / {step.rule}" if step.rule else "")
    lines = [f"#{step.index} {label}" + (f"  ({step.rule_source})" if step.rule_source else "")]
    if step.anchor:
        lines.append(f"anchor: {step.anchor}")
    removed = ", ".join(step.removed) or "(none)"
    added = ", ".join(step.added) or "(none)"
    lines.append(f"removed: {removed}")
    lines.append(f"added:   {added}")
    lines.append(f"{removed} -> {added}")
    for name, origins in step.provenance.items():
        lines.append(f"  {name} <- {', '.join(origins) or '(no original node)'}")
    if step.initializers_removed or step.initializers_added:
        lines.append(
            f"constants: -{len(step.initializers_removed)} +{len(step.initializers_added)}"
        )
    lines.append(
        f"nodes {step.before.node_count} -> {step.after.node_count}; estimated latency "
        f"{step.before.latency_ms:.3f} -> {step.after.latency_ms:.3f} ms"
    )
    return "\n".join(lines)


def position_html(steps: list[Step], position: int) -> str:
    """The scrubber's text at ``position`` (escaped HTML)."""
    if position == 0:
        return f"<b>original graph</b> (0 of {len(steps)} steps applied)"
    step = steps[position - 1]
    return (
        f"<b>{position} of {len(steps)} steps applied</b>"
        f"<pre>{escaped(step.summary())}</pre><pre>{escaped(step_diff_text(step))}</pre>"
    )


class StepScrubber(ipywidgets.VBox):
    """IntSlider over ``0..len(session.steps)`` plus the diff of the last applied step.

    Moving ``slider`` calls ``session.goto``; any session change (step, undo, redo, a new
    pipeline) moves the slider back in line. Parts: ``slider`` (IntSlider), ``text`` (HTML).
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self._syncing = False
        steps = session.steps
        self.slider = ipywidgets.IntSlider(
            value=session.position,
            min=0,
            max=len(steps),
            step=1,
            description="Step",
            continuous_update=False,
        )
        self.text = ipywidgets.HTML(value=position_html(steps, session.position))
        super().__init__([self.slider, self.text])
        self.slider.observe(self._slider_moved, names="value")
        session.on_change(self._on_session_change)

    def _slider_moved(self, change: dict[str, Any]) -> None:
        if not self._syncing:
            self.session.goto(change["new"])

    def _on_session_change(self, session: Any) -> None:
        steps = session.steps
        previous, self._syncing = self._syncing, True
        try:
            self.slider.max = len(steps)
            self.slider.value = session.position
        finally:
            self._syncing = previous
        self.text.value = position_html(steps, session.position)
