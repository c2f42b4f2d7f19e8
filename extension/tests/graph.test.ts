import { describe, expect, it, vi } from 'vitest';

import { formatG, PALETTE } from '../src/colors';
import { StudioView } from '../src/graph';
import { parsePayload } from '../src/schema';
import type { SessionPayload } from '../src/schema';
import { fixture, HAS_FIXTURES, HOSTILE, syntheticPayload } from './fixtures';

function mount(payload: SessionPayload, step?: number, options = {}): StudioView {
  const view = new StudioView(options);
  document.body.replaceChildren(view.node);
  view.setPayload(payload, step);
  return view;
}

function nodeElement(view: StudioView, id: string): SVGGElement {
  const found = [...view.node.querySelectorAll<SVGGElement>('g.gie-node')].find(g => g.getAttribute('data-id') === id);
  if (found === undefined) {
    throw new Error(`no node ${id}`);
  }
  return found;
}

function click(element: Element): void {
  element.dispatchEvent(new MouseEvent('click', { bubbles: true }));
}

describe('the DOM contract (synthetic)', () => {
  it('has the toolbar, graph, timeline, provenance, panel and legend', () => {
    const view = mount(syntheticPayload(), 0);
    const root = view.node;
    expect(root.matches('div.gie-studio[data-schema-version="1"]')).toBe(true);
    for (const selector of [
      'div.gie-toolbar input.gie-search[type=search]',
      'div.gie-toolbar select.gie-overlay',
      'button.gie-fit',
      'button.gie-zoom-in',
      'button.gie-zoom-out',
      'div.gie-graph > svg.gie-graph-svg > g.gie-viewport',
      'div.gie-timeline input.gie-timeline-slider[type=range]',
      'span.gie-timeline-label',
      'ol.gie-steps li.gie-step[data-index="1"]',
      'div.gie-provenance',
      'div.gie-panel h3.gie-panel-title',
      'div.gie-legend span.gie-legend-item'
    ]) {
      expect(root.querySelector(selector), selector).not.toBeNull();
    }
    const options = [...root.querySelectorAll('select.gie-overlay option')].map(o => o.textContent);
    expect(options).toEqual(['family', 'precision', 'latency', 'error']);
    expect(root.querySelectorAll('g.gie-node')).toHaveLength(6);
    const edge = root.querySelector('path.gie-edge[data-source="conv"][data-target="bn"]');
    expect(edge).not.toBeNull();
    const slider = root.querySelector<HTMLInputElement>('input.gie-timeline-slider')!;
    expect([slider.min, slider.max, slider.value]).toEqual(['0', '2', '0']);
    expect(nodeElement(view, 'conv').getAttribute('data-op')).toBe('Conv');
    expect(nodeElement(view, 'conv').getAttribute('data-family')).toBe('conv');
    expect(root.querySelector('select.gie-precision')).toBeNull(); // read-only view
  });

  it('ghosts the removed nodes and highlights the added ones at a fusion step', () => {
    const view = mount(syntheticPayload(), 1);
    const removed = [...view.node.querySelectorAll('g.gie-node.gie-removed')].map(g => g.getAttribute('data-id'));
    const added = [...view.node.querySelectorAll('g.gie-node.gie-added')].map(g => g.getAttribute('data-id'));
    expect(removed).toEqual(['conv', 'bn', 'relu']);
    expect(added).toEqual(['fused']);
    expect(view.node.querySelectorAll('path.gie-edge.gie-added')).toHaveLength(2);
    expect(view.node.querySelectorAll('path.gie-edge.gie-removed')).toHaveLength(4);
    expect(view.node.querySelector('.gie-provenance')!.textContent).toBe(
      'fused: fused from conv, bn, relu by rule conv_bn_act'
    );
    expect(view.node.querySelector('.gie-timeline-label')!.textContent).toBe('step 1 / 2: epilogue conv_bn_act');
    expect(view.node.querySelector('li.gie-step-current')!.getAttribute('data-index')).toBe('0');
  });

  it('moves on the timeline by slider and step list and reports the step', () => {
    const onStep = vi.fn();
    const view = mount(syntheticPayload(), 0, { onStep });
    const slider = view.node.querySelector<HTMLInputElement>('input.gie-timeline-slider')!;
    slider.value = '2';
    slider.dispatchEvent(new Event('input'));
    expect(onStep).toHaveBeenLastCalledWith(2);
    expect(view.node.querySelectorAll('g.gie-node')).toHaveLength(4); // 3 visible + ghost "dead"
    click(view.node.querySelector('li.gie-step[data-index="0"]')!);
    expect(onStep).toHaveBeenLastCalledWith(1);
    expect(view.step).toBe(1);
    expect(nodeElement(view, 'fused').classList.contains('gie-added')).toBe(true);
  });

  it('colours nodes from the palette for each overlay and lists the colours in the legend', () => {
    const view = mount(syntheticPayload(), 2);
    const fill = (id: string) => nodeElement(view, id).querySelector('rect')!.getAttribute('fill');
    expect(fill('fused')).toBe(PALETTE.family['conv']);
    expect(fill('input:x')).toBe(PALETTE.family['io']);
    const select = view.node.querySelector<HTMLSelectElement>('select.gie-overlay')!;
    select.value = 'precision';
    select.dispatchEvent(new Event('change'));
    expect(fill('fused')).toBe(PALETTE.precision['fp16']);
    expect(fill('input:x')).toBe(PALETTE.neutral);
    const legend = [...view.node.querySelectorAll('.gie-legend-item')].map(item => [item.textContent, item.getAttribute('data-color')]);
    expect(legend).toEqual([
      ['fp16', PALETTE.precision['fp16']],
      ['no data', PALETTE.neutral]
    ]);
    view.setOverlay('latency');
    expect(fill('fused')).toBe(PALETTE.latency_scale[4][1]);
    expect(nodeElement(view, 'fused').getAttribute('data-precision')).toBe('fp16');
  });

  it('selects a node on click, fills the panel and offers the precision in the widget', () => {
    const onSelect = vi.fn();
    const onPrecision = vi.fn();
    const view = mount(syntheticPayload(), 2, { editable: true, onSelect, onPrecision });
    click(nodeElement(view, 'fused').querySelector('rect')!);
    expect(onSelect).toHaveBeenCalledWith('fused');
    expect(nodeElement(view, 'fused').classList.contains('gie-selected')).toBe(true);
    const panel = view.node.querySelector('.gie-panel')!;
    expect(panel.querySelector('h3.gie-panel-title')!.textContent).toBe('fused');
    const rows = Object.fromEntries([...panel.querySelectorAll('tr')].map(tr => [tr.getAttribute('data-field'), tr.querySelector('td')!.textContent]));
    expect(rows['precision']).toBe('fp16');
    expect(rows['tactic']).toBe('im2col');
    expect(rows['latency']).toBe('0.5000 ms');
    expect(rows['scales']).toBe('0.5, 0.25');
    expect(rows['origins']).toBe('conv, bn, relu');
    const select = panel.querySelector<HTMLSelectElement>('select.gie-precision')!;
    expect(select.value).toBe('fp16');
    select.value = 'int8';
    select.dispatchEvent(new Event('change'));
    expect(onPrecision).toHaveBeenCalledWith('fused', 'int8');
    view.setDelta('fused -> int8: 1 layer(s) re-tuned');
    expect(panel.querySelector('.gie-delta')!.textContent).toBe('fused -> int8: 1 layer(s) re-tuned');
  });

  it('searches by name or op, zooms with the wheel and buttons and pans by drag', () => {
    const view = mount(syntheticPayload(), 0);
    const search = view.node.querySelector<HTMLInputElement>('input.gie-search')!;
    search.value = 'relu';
    search.dispatchEvent(new Event('input'));
    expect([...view.node.querySelectorAll('g.gie-match')].map(g => g.getAttribute('data-id'))).toEqual(['relu']);
    search.value = 'batchnorm';
    search.dispatchEvent(new Event('input'));
    expect([...view.node.querySelectorAll('g.gie-match')].map(g => g.getAttribute('data-id'))).toEqual(['bn']);
    const viewport = view.node.querySelector('g.gie-viewport')!;
    const before = view.viewTransform.scale;
    view.node.querySelector('svg')!.dispatchEvent(new WheelEvent('wheel', { deltaY: -200, clientX: 10, clientY: 10, bubbles: true, cancelable: true }));
    expect(view.viewTransform.scale).toBeGreaterThan(before);
    expect(viewport.getAttribute('transform')).toContain(`scale(${view.viewTransform.scale.toFixed(4)})`);
    view.node.querySelector<HTMLButtonElement>('button.gie-zoom-out')!.click();
    view.node.querySelector<HTMLButtonElement>('button.gie-fit')!.click();
    expect(view.viewTransform.scale).toBe(before);
    const svg = view.node.querySelector('svg')!;
    const x = view.viewTransform.x;
    svg.dispatchEvent(new MouseEvent('mousedown', { button: 0, clientX: 100, clientY: 100, bubbles: true }));
    svg.dispatchEvent(new MouseEvent('mousemove', { clientX: 150, clientY: 120, bubbles: true }));
    expect(view.viewTransform.x).toBe(x + 50);
  });
});

describe('escaping', () => {
  it('renders model strings as text: no element is created from a hostile name', () => {
    const payload = syntheticPayload();
    payload.title = HOSTILE;
    payload.nodes[1] = { ...payload.nodes[1], id: HOSTILE, op: `<script>alert(2)</script>`, why_not: [HOSTILE] };
    payload.edges = payload.edges.map(e => ({ ...e, source: e.source === 'conv' ? HOSTILE : e.source, target: e.target === 'conv' ? HOSTILE : e.target, value: HOSTILE }));
    payload.steps[0] = { ...payload.steps[0], removed: [HOSTILE, 'bn', 'relu'], provenance: { fused: [HOSTILE, 'bn', 'relu'] } };
    const view = mount(parsePayload(payload), 1);
    click(nodeElement(view, HOSTILE));
    expect(document.querySelectorAll('img, script')).toHaveLength(0);
    expect(nodeElement(view, HOSTILE).querySelector('.gie-node-label')!.textContent).toBe(HOSTILE);
    expect(view.node.querySelector('.gie-title')!.textContent).toBe(HOSTILE);
    expect(view.node.querySelector('.gie-panel-title')!.textContent).toBe(HOSTILE);
    expect(view.node.querySelector('.gie-why-not')!.textContent).toBe(HOSTILE);
    expect(view.node.querySelector('.gie-provenance')!.textContent).toContain(HOSTILE);
  });
});

describe('formatG', () => {
  it('writes numbers like Python format .3g', () => {
    expect([0.0123456, 1.5, 1234.5, 0.00001234, 0.5, 12].map(v => formatG(v))).toEqual(['0.0123', '1.5', '1.23e+03', '1.23e-05', '0.5', '12']);
  });
});

describe.skipIf(!HAS_FIXTURES)('real sessions', () => {
  it('renders the hostile-name session literally, with no img element', () => {
    const view = mount(parsePayload(fixture('hostile.json')), 0);
    const hostile = nodeElement(view, HOSTILE);
    expect(hostile.querySelector('.gie-node-label')!.textContent).toBe(HOSTILE);
    click(hostile);
    expect(view.node.querySelector('.gie-panel-title')!.textContent).toBe(HOSTILE);
    expect(view.node.querySelector('.gie-title')!.textContent).toBe(HOSTILE);
    expect(document.querySelectorAll('img, script')).toHaveLength(0);
    const last = view.node.querySelector<HTMLInputElement>('input.gie-timeline-slider')!;
    last.value = last.max;
    last.dispatchEvent(new Event('input'));
    expect(document.querySelectorAll('img, script')).toHaveLength(0);
  });

  it('ghosts and highlights the nodes of every fusion step of the ResNet', () => {
    const payload = parsePayload(fixture('resnet.json'));
    const view = mount(payload, 0);
    const fusions = payload.steps.filter(step => step.added.length === 1 && step.removed.length > 1);
    expect(fusions.length).toBeGreaterThan(0);
    for (const step of fusions) {
      view.setStep(step.index + 1);
      const removed = [...view.node.querySelectorAll('g.gie-node.gie-removed')].map(g => g.getAttribute('data-id'));
      const added = [...view.node.querySelectorAll('g.gie-node.gie-added')].map(g => g.getAttribute('data-id'));
      expect(removed.sort()).toEqual([...step.removed].sort());
      expect(added).toEqual(step.added);
      const origins = step.provenance[step.added[0]];
      const text = view.node.querySelector('.gie-provenance')!.textContent!;
      expect(text.startsWith(`${step.added[0]}: fused from ${step.removed.join(', ')} by rule ${step.rule}`)).toBe(true);
      for (const name of [...step.removed, ...origins]) {
        expect(text).toContain(name);
      }
      expect(view.node.querySelector('li.gie-step-current')!.getAttribute('data-index')).toBe(String(step.index));
    }
  });

  it('names the original nodes of a fusion of already rewritten nodes, also on a click', () => {
    const payload = parsePayload(fixture('resnet.json'));
    const step = payload.steps.find(
      s => s.added.length === 1 && s.removed.some(name => !(s.provenance[s.added[0]] ?? []).includes(name))
    )!;
    expect(step).toBeDefined();
    const view = mount(payload, step.index + 1);
    const origins = step.provenance[step.added[0]];
    const verb = step.removed.length > 1 ? 'fused from' : 'rewritten from';
    const expected = `${step.added[0]}: ${verb} ${step.removed.join(', ')} by rule ${step.rule} (original nodes: ${origins.join(', ')})`;
    expect(view.node.querySelector('.gie-provenance')!.textContent).toBe(expected);
    view.node.querySelector('.gie-provenance')!.textContent = '';
    click(nodeElement(view, step.added[0]));
    expect(view.node.querySelector('.gie-provenance')!.textContent).toBe(expected);
  });

  it('colours the built ResNet by precision and latency from the palette', () => {
    const payload = parsePayload(fixture('resnet.json'));
    const view = mount(payload);
    view.setOverlay('precision');
    const layers = Object.keys(payload.layers);
    const drawn = [...view.node.querySelectorAll<SVGGElement>('g.gie-node')].filter(g => layers.includes(g.getAttribute('data-id')!));
    expect(drawn.length).toBeGreaterThan(5);
    for (const g of drawn) {
      const facts = payload.layers[g.getAttribute('data-id')!];
      const key = facts.role === 'reformat' ? 'reformat' : String(facts.precision);
      expect(g.querySelector('rect')!.getAttribute('fill')).toBe(PALETTE.precision[key]);
    }
    view.setOverlay('latency');
    const fills = new Set(drawn.map(g => g.querySelector('rect')!.getAttribute('fill')));
    expect(fills.size).toBeGreaterThan(2);
  });
});
