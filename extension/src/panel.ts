/**
 * The node panel: everything the payload knows about one node (op, attributes, outputs,
 * origins, and for an engine layer its precision and why, tactic, latency, candidates, scales),
 * its "why not" reasons, and in the widget the precision dropdown and the last rebuild's delta.
 */

import { PRECISION_CHOICES } from './schema';
import type { LayerFacts, SessionNode } from './schema';

export interface PanelOptions {
  /** Offer select.gie-precision (widget view only). */
  editable: boolean;
  /** The precision requested for this layer in the widget, if any. */
  override?: string;
  /** The last rebuild summary (widget view only). */
  delta: string;
  onPrecision?: (layer: string, precision: string) => void;
}

function formatMs(value: unknown): string {
  return typeof value === 'number' && Number.isFinite(value) ? `${value.toFixed(4)} ms` : '—';
}

function row(table: HTMLTableSectionElement, label: string, value: string | Node): void {
  const tr = document.createElement('tr');
  tr.setAttribute('data-field', label);
  const th = document.createElement('th');
  th.textContent = label;
  const td = document.createElement('td');
  if (typeof value === 'string') {
    td.textContent = value;
  } else {
    td.append(value);
  }
  tr.append(th, td);
  table.append(tr);
}

function candidatesList(facts: LayerFacts): Node {
  const list = document.createElement('ul');
  list.className = 'gie-candidates';
  for (const candidate of facts.candidates ?? []) {
    const item = document.createElement('li');
    const chosen = candidate.tactic === facts.tactic ? ' (chosen)' : '';
    const aborted = candidate.aborted ? ', aborted' : '';
    item.textContent = `${candidate.tactic}: ${formatMs(candidate.median_ms)} over ${candidate.samples} samples${aborted}${chosen}`;
    list.append(item);
  }
  return list;
}

function scalesText(scales: unknown): string {
  if (Array.isArray(scales)) {
    const shown = scales.slice(0, 8).map(value => String(value));
    return shown.join(', ') + (scales.length > 8 ? `, … (${scales.length} values)` : '');
  }
  return typeof scales === 'object' ? JSON.stringify(scales) : String(scales);
}

/** Fill `panel` (div.gie-panel) for `node` (or a hint when none is selected). */
export function renderPanel(
  panel: HTMLElement,
  node: SessionNode | undefined,
  facts: LayerFacts | undefined,
  options: PanelOptions
): void {
  const title = document.createElement('h3');
  title.className = 'gie-panel-title';
  const parts: Node[] = [title];
  if (node === undefined) {
    title.textContent = 'No node selected';
    const hint = document.createElement('p');
    hint.className = 'gie-panel-hint';
    hint.textContent = 'Click a node to see its attributes, precision, tactic and timings.';
    parts.push(hint);
  } else {
    title.textContent = node.id;
    const table = document.createElement('table');
    table.className = 'gie-panel-table';
    const body = document.createElement('tbody');
    table.append(body);
    row(body, 'op', node.domain ? `${node.domain}::${node.op}` : node.op);
    row(body, 'family', node.family);
    const attributes = Object.entries(node.attributes).map(([key, value]) => `${key}=${value}`);
    row(body, 'attributes', attributes.length > 0 ? attributes.join(', ') : '—');
    row(body, 'outputs', node.outputs.length > 0 ? node.outputs.join(', ') : '—');
    row(body, 'origins', node.origins.length > 0 ? node.origins.join(', ') : '—');
    if (node.rule) {
      row(body, 'rule', node.rule);
    }
    if (facts !== undefined) {
      row(body, 'precision', String(facts.precision ?? '—'));
      row(body, 'precision reason', facts.precision_reason ? facts.precision_reason : '—');
      row(body, 'tactic', String(facts.tactic ?? '—'));
      row(body, 'latency', formatMs(facts.latency_ms));
      if (typeof facts.cosine === 'number') {
        row(body, 'cosine vs fp32', facts.cosine.toFixed(6));
      }
      row(body, 'candidates', (facts.candidates ?? []).length > 0 ? candidatesList(facts) : '—');
      if (facts.scales !== undefined && facts.scales !== null) {
        row(body, 'scales', scalesText(facts.scales));
      }
    } else {
      row(body, 'precision', 'not an engine layer at the built step');
    }
    parts.push(table);
    if (node.why_not.length > 0) {
      const heading = document.createElement('h4');
      heading.textContent = 'Why not';
      const list = document.createElement('ul');
      list.className = 'gie-why-not-list';
      for (const reason of node.why_not) {
        const item = document.createElement('li');
        item.className = 'gie-why-not';
        item.textContent = reason;
        list.append(item);
      }
      parts.push(heading, list);
    }
    if (options.editable && facts !== undefined && facts.role === 'compute') {
      const label = document.createElement('label');
      label.className = 'gie-precision-label';
      label.textContent = 'precision ';
      const select = document.createElement('select');
      select.className = 'gie-precision';
      for (const choice of PRECISION_CHOICES) {
        const option = document.createElement('option');
        option.value = choice;
        option.textContent = choice;
        select.append(option);
      }
      select.value = options.override ?? String(facts.precision ?? 'fp32');
      select.addEventListener('change', () => options.onPrecision?.(node.id, select.value));
      label.append(select);
      parts.push(label);
    }
  }
  if (options.editable) {
    const delta = document.createElement('div');
    delta.className = 'gie-delta';
    delta.textContent = options.delta;
    parts.push(delta);
  }
  panel.replaceChildren(...parts);
}
