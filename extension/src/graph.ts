/**
 * The GIE Studio view (the DOM contract of extension/README.md): a toolbar (search, overlay,
 * fit, zoom), the SVG graph of one timeline position with zoom/pan through the viewport
 * transform, ghosted removed / highlighted added nodes, a legend, the timeline, the provenance
 * line and the node panel. The MIME renderer and the widget view both use it; every string
 * from the payload goes into the DOM through textContent or setAttribute.
 */

import { nodeColors, textColor } from './colors';
import { edgePath, layoutGraph, NODE_HEIGHT, NODE_WIDTH } from './layout';
import type { Layout } from './layout';
import { renderPanel } from './panel';
import { OVERLAYS, SCHEMA_VERSION, stepView } from './schema';
import type { Overlay, SessionNode, SessionPayload, StepView } from './schema';
import { nodeProvenance, provenanceText, TimelineView } from './timeline';

const SVG_NS = 'http://www.w3.org/2000/svg';
/** Node labels longer than this are shortened to their last characters. */
export const LABEL_CHARS = 30;
const MIN_SCALE = 0.02;
const MAX_SCALE = 4;
let viewCount = 0;

export interface StudioOptions {
  /** Widget view: offer the precision dropdown and show the rebuild delta. */
  editable?: boolean;
  onSelect?: (id: string) => void;
  onStep?: (k: number) => void;
  onOverlay?: (overlay: Overlay) => void;
  onPrecision?: (layer: string, precision: string) => void;
}

export interface Transform {
  scale: number;
  x: number;
  y: number;
}

/** `name` cut to its last `limit` characters (the informative end of ONNX paths). */
export function shorten(name: string, limit: number = LABEL_CHARS): string {
  return name.length <= limit ? name : '…' + name.slice(name.length - limit + 1);
}

function svg<K extends keyof SVGElementTagNameMap>(tag: K, cls?: string): SVGElementTagNameMap[K] {
  const element = document.createElementNS(SVG_NS, tag);
  if (cls) {
    element.setAttribute('class', cls);
  }
  return element;
}

function html<K extends keyof HTMLElementTagNameMap>(tag: K, cls?: string): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  if (cls) {
    element.className = cls;
  }
  return element;
}

export class StudioView {
  readonly node: HTMLDivElement;
  private readonly options: StudioOptions;
  private readonly search: HTMLInputElement;
  private readonly searchCount: HTMLSpanElement;
  private readonly overlaySelect: HTMLSelectElement;
  private readonly title: HTMLSpanElement;
  private readonly svgElement: SVGSVGElement;
  private readonly viewport: SVGGElement;
  private readonly legend: HTMLDivElement;
  private readonly provenance: HTMLDivElement;
  private readonly panel: HTMLDivElement;
  private readonly timeline: TimelineView;
  private readonly markerId: string;
  private payload: SessionPayload | null = null;
  private position = 0;
  private selected = '';
  private overlay: Overlay = 'family';
  private delta = '';
  private overrides: Record<string, string> = {};
  private view: StepView | null = null;
  private layout: Layout | null = null;
  private layoutKey = '';
  private nodeElements = new Map<string, SVGGElement>();
  private transform: Transform = { scale: 1, x: 0, y: 0 };
  private userMoved = false;
  private drag: { x: number; y: number; moved: boolean } | null = null;
  private resizeObserver: ResizeObserver | null = null;

  constructor(options: StudioOptions = {}) {
    this.options = options;
    this.markerId = `gie-arrow-${++viewCount}`;
    this.node = html('div', 'gie-studio');
    this.node.setAttribute('data-schema-version', String(SCHEMA_VERSION));
    // keys typed in the view's controls (search box, slider arrows, selects) are theirs: the
    // notebook's document-level shortcut handling would otherwise swallow them
    this.node.setAttribute('data-lm-suppress-shortcuts', 'true');
    this.node.addEventListener('keydown', event => {
      if ((event.target as Element).closest('input, select, button') !== null) {
        event.stopPropagation();
      }
    });

    const toolbar = html('div', 'gie-toolbar');
    this.title = html('span', 'gie-title');
    this.search = html('input', 'gie-search');
    this.search.type = 'search';
    this.search.placeholder = 'search name or op';
    this.search.setAttribute('aria-label', 'search nodes by name or op');
    this.search.addEventListener('input', () => this.applySearch());
    this.search.addEventListener('keydown', event => {
      if (event.key === 'Enter') {
        this.centreOnFirstMatch();
      }
    });
    this.searchCount = html('span', 'gie-search-count');
    this.overlaySelect = html('select', 'gie-overlay');
    this.overlaySelect.setAttribute('aria-label', 'overlay');
    for (const overlay of OVERLAYS) {
      const option = html('option');
      option.value = overlay;
      option.textContent = overlay;
      this.overlaySelect.append(option);
    }
    this.overlaySelect.addEventListener('change', () => {
      const value = this.overlaySelect.value as Overlay;
      this.setOverlay(value);
      this.options.onOverlay?.(value);
    });
    const button = (cls: string, text: string, title: string, action: () => void): HTMLButtonElement => {
      const element = html('button', cls);
      element.type = 'button';
      element.textContent = text;
      element.title = title;
      element.addEventListener('click', action);
      return element;
    };
    toolbar.append(
      this.title,
      this.search,
      this.searchCount,
      this.overlaySelect,
      button('gie-fit', 'Fit', 'fit the graph to the view', () => this.fit()),
      button('gie-zoom-in', '+', 'zoom in', () => this.zoomAtCentre(1.25)),
      button('gie-zoom-out', '−', 'zoom out', () => this.zoomAtCentre(0.8))
    );

    const main = html('div', 'gie-main');
    const graph = html('div', 'gie-graph');
    this.svgElement = svg('svg', 'gie-graph-svg');
    this.svgElement.setAttribute('role', 'img');
    const defs = svg('defs');
    const marker = svg('marker');
    marker.setAttribute('id', this.markerId);
    for (const [key, value] of Object.entries({
      viewBox: '0 0 10 10', refX: '10', refY: '5', markerWidth: '7', markerHeight: '7',
      orient: 'auto-start-reverse'
    })) {
      marker.setAttribute(key, value);
    }
    const arrow = svg('path');
    arrow.setAttribute('d', 'M0,0 L10,5 L0,10 z');
    arrow.setAttribute('class', 'gie-arrow');
    marker.append(arrow);
    defs.append(marker);
    this.viewport = svg('g', 'gie-viewport');
    this.svgElement.append(defs, this.viewport);
    graph.append(this.svgElement);
    this.panel = html('div', 'gie-panel');
    main.append(graph, this.panel);

    this.legend = html('div', 'gie-legend');
    this.timeline = new TimelineView(k => this.requestStep(k));
    this.provenance = html('div', 'gie-provenance');
    this.node.append(toolbar, main, this.legend, this.timeline.node, this.provenance);
    this.bindPointer();
    if (typeof ResizeObserver !== 'undefined') {
      // refit once the view gets a size (it is often built before it is attached)
      this.resizeObserver = new ResizeObserver(() => {
        if (!this.userMoved && this.svgElement.clientWidth > 0) {
          this.fit(false);
        }
        this.timeline.setStep(this.position); // scrolls the current step into the list's view
      });
      this.resizeObserver.observe(this.svgElement);
    }
  }

  /** Stop observing the element's size. */
  dispose(): void {
    this.resizeObserver?.disconnect();
    this.resizeObserver = null;
  }

  // ------------------------------------------------------------------ state setters

  /** Show a new payload at `step` (default: its current_step). */
  setPayload(payload: SessionPayload, step: number = payload.current_step): void {
    this.payload = payload;
    this.title.textContent = payload.title;
    this.timeline.setPayload(payload);
    this.position = Math.min(Math.max(step, 0), payload.steps.length);
    this.render();
  }

  setStep(k: number): void {
    if (this.payload === null) {
      this.position = k;
      return;
    }
    const clamped = Math.min(Math.max(k, 0), this.payload.steps.length);
    if (clamped !== this.position || this.view === null) {
      this.position = clamped;
      this.render();
    }
  }

  setSelected(id: string): void {
    this.selected = id;
    for (const [nodeId, element] of this.nodeElements) {
      element.classList.toggle('gie-selected', nodeId === id);
    }
    this.renderPanel();
  }

  setOverlay(overlay: Overlay): void {
    this.overlay = overlay;
    this.overlaySelect.value = overlay;
    this.applyColors();
  }

  setDelta(text: string): void {
    this.delta = text;
    const element = this.panel.querySelector('.gie-delta');
    if (element !== null) {
      element.textContent = text;
    }
  }

  setOverrides(overrides: Record<string, string>): void {
    this.overrides = { ...overrides };
    this.renderPanel();
  }

  get step(): number {
    return this.position;
  }

  get viewTransform(): Transform {
    return { ...this.transform };
  }

  /** The layout of the last render (for tests and benchmarks). */
  get currentLayout(): Layout | null {
    return this.layout;
  }

  // ------------------------------------------------------------------ rendering

  private requestStep(k: number): void {
    this.setStep(k);
    this.options.onStep?.(this.position);
  }

  private render(): void {
    const payload = this.payload;
    if (payload === null) {
      return;
    }
    const view = stepView(payload, this.position);
    this.view = view;
    const ids = view.nodes.map(node => node.id);
    const pairs = view.edges.map(edge => [edge.source, edge.target] as const);
    const key = ids.join('\n') + '\u0001' + pairs.map(pair => pair.join('\n')).join('\n');
    const relayout = key !== this.layoutKey;
    if (relayout) {
      this.layout = layoutGraph(ids, pairs);
      this.layoutKey = key;
    }
    const layout = this.layout!;
    const edgeGroup = svg('g', 'gie-edges');
    for (const edge of view.edges) {
      const path = svg('path', 'gie-edge');
      path.setAttribute('data-source', edge.source);
      path.setAttribute('data-target', edge.target);
      path.setAttribute('d', edgePath(layout.positions.get(edge.source)!, layout.positions.get(edge.target)!));
      path.setAttribute('marker-end', `url(#${this.markerId})`);
      if (edge.died === this.position - 1) {
        path.classList.add('gie-removed');
      } else if (edge.born === this.position - 1) {
        path.classList.add('gie-added');
      }
      const title = svg('title');
      title.textContent = edge.value;
      path.append(title);
      edgeGroup.append(path);
    }
    const nodeGroup = svg('g', 'gie-nodes');
    this.nodeElements = new Map();
    for (const node of view.nodes) {
      const element = this.drawNode(node, layout);
      if (view.removed.has(node.id)) {
        element.classList.add('gie-removed');
      } else if (view.added.has(node.id)) {
        element.classList.add('gie-added');
      }
      if (node.id === this.selected) {
        element.classList.add('gie-selected');
      }
      this.nodeElements.set(node.id, element);
      nodeGroup.append(element);
    }
    this.viewport.replaceChildren(edgeGroup, nodeGroup);
    this.svgElement.setAttribute('data-layout', layout.method);
    this.svgElement.setAttribute('data-node-count', String(view.nodes.length));
    this.applyColors();
    this.applySearch();
    this.timeline.setStep(this.position);
    this.provenance.textContent = provenanceText(payload, this.position);
    this.renderPanel();
    if (relayout && !this.userMoved) {
      this.fit(false);
    } else {
      this.applyTransform();
    }
  }

  private drawNode(node: SessionNode, layout: Layout): SVGGElement {
    const centre = layout.positions.get(node.id)!;
    const group = svg('g', 'gie-node');
    group.setAttribute('data-id', node.id);
    group.setAttribute('data-op', node.op);
    group.setAttribute('data-family', node.family);
    const facts = this.payload?.layers[node.id];
    if (facts?.precision !== undefined) {
      group.setAttribute('data-precision', String(facts.precision));
    }
    group.setAttribute('transform', `translate(${(centre.x - NODE_WIDTH / 2).toFixed(1)},${(centre.y - NODE_HEIGHT / 2).toFixed(1)})`);
    const title = svg('title');
    title.textContent = `${node.id} (${node.op}, ${node.family})`;
    const rect = svg('rect');
    rect.setAttribute('width', String(NODE_WIDTH));
    rect.setAttribute('height', String(NODE_HEIGHT));
    rect.setAttribute('rx', '5');
    const op = svg('text', 'gie-node-op');
    op.setAttribute('x', String(NODE_WIDTH / 2));
    op.setAttribute('y', '16');
    op.textContent = shorten(node.domain ? `${node.domain}::${node.op}` : node.op);
    const label = svg('text', 'gie-node-label');
    label.setAttribute('x', String(NODE_WIDTH / 2));
    label.setAttribute('y', '31');
    label.textContent = shorten(node.id);
    group.append(title, rect, op, label);
    return group;
  }

  private applyColors(): void {
    if (this.payload === null || this.view === null) {
      return;
    }
    const { fills, legend } = nodeColors(this.view.nodes, this.payload.layers, this.overlay);
    for (const [id, element] of this.nodeElements) {
      const fill = fills.get(id) ?? '#BBBBBB';
      element.setAttribute('data-fill', fill);
      element.querySelector('rect')?.setAttribute('fill', fill);
      const ink = textColor(fill);
      element.querySelectorAll('text').forEach(text => text.setAttribute('fill', ink));
    }
    this.legend.replaceChildren(
      ...legend.map(([label, color]) => {
        const item = html('span', 'gie-legend-item');
        item.setAttribute('data-color', color);
        const swatch = html('span', 'gie-legend-swatch');
        swatch.style.backgroundColor = color;
        item.append(swatch, document.createTextNode(label));
        return item;
      })
    );
  }

  private applySearch(): void {
    const query = this.search.value.trim().toLowerCase();
    let count = 0;
    for (const [id, element] of this.nodeElements) {
      const op = element.getAttribute('data-op') ?? '';
      const match = query !== '' && (id.toLowerCase().includes(query) || op.toLowerCase().includes(query));
      element.classList.toggle('gie-match', match);
      count += match ? 1 : 0;
    }
    this.searchCount.textContent = query === '' ? '' : `${count} match${count === 1 ? '' : 'es'}`;
  }

  private renderPanel(): void {
    const node = this.payload?.nodes.find(candidate => candidate.id === this.selected);
    renderPanel(this.panel, node, node ? this.payload?.layers[node.id] : undefined, {
      editable: this.options.editable ?? false,
      override: node ? this.overrides[node.id] : undefined,
      delta: this.delta,
      onPrecision: (layer, precision) => {
        this.overrides = { ...this.overrides, [layer]: precision };
        this.options.onPrecision?.(layer, precision);
      }
    });
  }

  private showNodeProvenance(id: string): void {
    const node = this.payload?.nodes.find(candidate => candidate.id === id);
    if (node !== undefined && this.view?.added.has(id)) {
      this.provenance.textContent = nodeProvenance(node, this.view.step);
    }
  }

  // ------------------------------------------------------------------ zoom and pan

  private size(): { width: number; height: number } {
    const width = this.svgElement.clientWidth || 800;
    const height = this.svgElement.clientHeight || 500;
    return { width, height };
  }

  private applyTransform(): void {
    const { scale, x, y } = this.transform;
    this.viewport.setAttribute('transform', `translate(${x.toFixed(2)},${y.toFixed(2)}) scale(${scale.toFixed(4)})`);
  }

  /** Scale and centre the graph into the visible area (`byUser` keeps it from auto-refits). */
  fit(byUser = true): void {
    if (byUser) {
      this.userMoved = false;
    }
    const layout = this.layout;
    if (layout === null) {
      return;
    }
    const { width, height } = this.size();
    const graphWidth = Math.max(layout.width, 1);
    const graphHeight = Math.max(layout.height, 1);
    const scale = Math.min(Math.max(Math.min(width / graphWidth, height / graphHeight), MIN_SCALE), 1.5);
    this.transform = {
      scale,
      x: (width - graphWidth * scale) / 2,
      y: Math.max((height - graphHeight * scale) / 2, 0)
    };
    this.applyTransform();
  }

  /** Multiply the zoom by `factor` keeping the point (px, py) of the SVG still. */
  zoomAt(factor: number, px: number, py: number): void {
    const { scale, x, y } = this.transform;
    const next = Math.min(Math.max(scale * factor, MIN_SCALE), MAX_SCALE);
    const ratio = next / scale;
    this.transform = { scale: next, x: px - (px - x) * ratio, y: py - (py - y) * ratio };
    this.userMoved = true;
    this.applyTransform();
  }

  zoomAtCentre(factor: number): void {
    const { width, height } = this.size();
    this.zoomAt(factor, width / 2, height / 2);
  }

  /** Move the graph by (dx, dy) screen pixels. */
  panBy(dx: number, dy: number): void {
    this.transform = { ...this.transform, x: this.transform.x + dx, y: this.transform.y + dy };
    this.userMoved = true;
    this.applyTransform();
  }

  private centreOnFirstMatch(): void {
    const first = [...this.nodeElements.entries()].find(([, element]) => element.classList.contains('gie-match'));
    const centre = first ? this.layout?.positions.get(first[0]) : undefined;
    if (centre === undefined) {
      return;
    }
    const { width, height } = this.size();
    const scale = Math.max(this.transform.scale, 0.8);
    this.transform = { scale, x: width / 2 - centre.x * scale, y: height / 2 - centre.y * scale };
    this.userMoved = true;
    this.applyTransform();
  }

  private bindPointer(): void {
    const target = this.svgElement;
    target.addEventListener(
      'wheel',
      event => {
        event.preventDefault();
        const box = target.getBoundingClientRect();
        this.zoomAt(Math.exp(-event.deltaY * 0.0015), event.clientX - box.left, event.clientY - box.top);
      },
      { passive: false }
    );
    target.addEventListener('mousedown', event => {
      if (event.button === 0) {
        this.drag = { x: event.clientX, y: event.clientY, moved: false };
      }
    });
    const move = (event: MouseEvent): void => {
      if (this.drag === null) {
        return;
      }
      const dx = event.clientX - this.drag.x;
      const dy = event.clientY - this.drag.y;
      if (this.drag.moved || Math.abs(dx) + Math.abs(dy) > 3) {
        this.drag = { x: event.clientX, y: event.clientY, moved: true };
        this.panBy(dx, dy);
      }
    };
    target.addEventListener('mousemove', move);
    const end = (): void => {
      window.setTimeout(() => (this.drag = null), 0);
    };
    target.addEventListener('mouseup', end);
    target.addEventListener('mouseleave', () => (this.drag = null));
    target.addEventListener('click', event => {
      if (this.drag?.moved) {
        return; // the end of a pan, not a click
      }
      const element = (event.target as Element).closest('g.gie-node');
      const id = element?.getAttribute('data-id');
      if (id !== null && id !== undefined) {
        this.setSelected(id);
        this.showNodeProvenance(id);
        this.options.onSelect?.(id);
      }
    });
    target.addEventListener('mouseover', event => {
      const id = (event.target as Element).closest('g.gie-node')?.getAttribute('data-id');
      if (id) {
        this.showNodeProvenance(id);
      }
    });
    target.addEventListener('mouseout', event => {
      const from = (event.target as Element).closest('g.gie-node');
      const to = (event.relatedTarget as Element | null)?.closest?.('g.gie-node') ?? null;
      if (from !== null && from !== to && this.payload !== null && this.selected === '') {
        this.provenance.textContent = provenanceText(this.payload, this.position);
      }
    });
  }
}
