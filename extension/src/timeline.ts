/**
 * The rewrite timeline: a slider over positions 0..N, the list of recorded steps, and the
 * provenance sentence of the current step ("fused from A, B, C by rule R").
 */

import type { SessionNode, SessionPayload, SessionStep } from './schema';

/** Text of `label`-like spans: "step k / N: pass rule" (k = applied steps). */
export function stepLabel(payload: SessionPayload, k: number): string {
  const total = payload.steps.length;
  const step = k > 0 ? payload.steps[k - 1] : undefined;
  if (step === undefined) {
    return `step ${k} / ${total}: original graph`;
  }
  return `step ${k} / ${total}: ${step.pass}${step.rule ? ` ${step.rule}` : ''}`;
}

function byRule(step: SessionStep, rule: string | null): string {
  const name = rule ?? step.rule;
  return name ? ` by rule ${name}` : ` by pass ${step.pass}`;
}

function sameNames(a: readonly string[], b: readonly string[]): boolean {
  return a.length === b.length && [...a].sort().join('\n') === [...b].sort().join('\n');
}

/**
 * How `added` came out of `step`: "X: fused from A, B by rule R", the nodes the step replaced,
 * then the original ONNX nodes it stems from when they differ ("(original nodes: ...)").
 */
function addedProvenance(added: string, origins: readonly string[], step: SessionStep, rule: string | null): string {
  const from = step.removed.length > 0 ? step.removed : origins;
  const verb = from.length > 1 ? 'fused from' : 'rewritten from';
  const original =
    origins.length > 0 && !sameNames(origins, from) ? ` (original nodes: ${origins.join(', ')})` : '';
  return `${added}: ${verb} ${from.length > 0 ? from.join(', ') : 'nothing recorded'}${byRule(step, rule)}${original}`;
}

/** The provenance of one node: how the step that created it made it, else its origins. */
export function nodeProvenance(node: SessionNode, step: SessionStep | null): string {
  if (step !== null && step.added.includes(node.id)) {
    return addedProvenance(node.id, step.provenance[node.id] ?? node.origins, step, node.rule);
  }
  const from = node.origins.length > 0 ? node.origins.join(', ') : 'nothing recorded';
  return `${node.id}: from ${from}${node.rule ? ` by rule ${node.rule}` : ''}`;
}

/** The provenance text of position `k` (what step `k - 1` did). */
/** What a node-less step did to the constants ("dropped 50 unused constants: a, b, c, ..."). */
function constantsText(step: SessionStep): string | null {
  const list = (key: string): string[] => {
    const value = step[key];
    return Array.isArray(value) ? value.filter((v): v is string => typeof v === 'string') : [];
  };
  const shown = (names: string[]): string =>
    names.slice(0, 3).join(', ') + (names.length > 3 ? ', ...' : '');
  const dropped = list('initializers_removed');
  const created = list('initializers_added');
  const parts: string[] = [];
  if (dropped.length > 0) {
    parts.push(`dropped ${dropped.length} unused constant(s): ${shown(dropped)}`);
  }
  if (created.length > 0) {
    parts.push(`created ${created.length} constant(s): ${shown(created)}`);
  }
  return parts.length > 0 ? parts.join('; ') : null;
}

export function provenanceText(payload: SessionPayload, k: number): string {
  const step = k > 0 ? payload.steps[k - 1] : undefined;
  if (step === undefined) {
    return 'original graph: no rewrite applied';
  }
  const parts = step.added.map(added => addedProvenance(added, step.provenance[added] ?? [], step, null));
  if (parts.length === 0) {
    if (step.removed.length > 0) {
      parts.push(`removed ${step.removed.join(', ')}${byRule(step, null)}`);
    } else {
      parts.push(`${constantsText(step) ?? 'changed no node'}${byRule(step, null)}`);
    }
  }
  return parts.join('; ');
}

/** The timeline element; `onStep(k)` is called with the position the user asks for. */
export class TimelineView {
  readonly node: HTMLDivElement;
  private readonly slider: HTMLInputElement;
  private readonly label: HTMLSpanElement;
  private readonly list: HTMLOListElement;
  private items: HTMLLIElement[] = [];
  private payload: SessionPayload | null = null;

  constructor(private readonly onStep: (k: number) => void) {
    const doc = document;
    this.node = doc.createElement('div');
    this.node.className = 'gie-timeline';
    const head = doc.createElement('div');
    head.className = 'gie-timeline-head';
    this.slider = doc.createElement('input');
    this.slider.className = 'gie-timeline-slider';
    this.slider.type = 'range';
    this.slider.min = '0';
    this.slider.step = '1';
    this.slider.setAttribute('aria-label', 'optimizer step');
    this.slider.addEventListener('input', () => this.onStep(Number(this.slider.value)));
    this.label = doc.createElement('span');
    this.label.className = 'gie-timeline-label';
    head.append(this.slider, this.label);
    this.list = doc.createElement('ol');
    this.list.className = 'gie-steps';
    this.list.start = 1;
    this.list.addEventListener('click', event => {
      const item = (event.target as Element).closest('li.gie-step');
      if (item !== null && this.list.contains(item)) {
        this.onStep(Number(item.getAttribute('data-index')) + 1);
      }
    });
    this.node.append(head, this.list);
  }

  /** Rebuild the step list for a new payload. */
  setPayload(payload: SessionPayload): void {
    this.payload = payload;
    this.slider.max = String(payload.steps.length);
    this.items = payload.steps.map((step, index) => {
      const item = document.createElement('li');
      item.className = 'gie-step';
      item.setAttribute('data-index', String(index));
      const name = document.createElement('span');
      name.className = 'gie-step-name';
      name.textContent = step.rule ? `${step.pass}: ${step.rule}` : step.pass;
      const counts = document.createElement('span');
      counts.className = 'gie-step-counts';
      counts.textContent = ` −${step.removed.length} +${step.added.length}`;
      item.append(name, counts);
      item.title = provenanceText(payload, index + 1);
      return item;
    });
    this.list.replaceChildren(...this.items);
  }

  /** Show position `k`. */
  setStep(k: number): void {
    if (this.payload === null) {
      return;
    }
    this.slider.value = String(k);
    this.slider.setAttribute('value', String(k));
    this.label.textContent = stepLabel(this.payload, k);
    this.items.forEach((item, index) => item.classList.toggle('gie-step-current', index === k - 1));
    const current = this.items[k - 1];
    if (current !== undefined && this.list.clientHeight > 0) {
      const top = current.offsetTop - this.list.offsetTop;
      if (top < this.list.scrollTop || top > this.list.scrollTop + this.list.clientHeight - 20) {
        this.list.scrollTop = Math.max(0, top - this.list.clientHeight / 2);
      }
    }
  }
}
