/**
 * Deterministic top-to-bottom layout of the visible graph.
 *
 * Up to {@link DAGRE_LIMIT} nodes: dagre (network-simplex ranking, crossing reduction). Above
 * that: a cheaper layered layout (longest-path layers, a few barycenter sweeps; linear-ish in
 * nodes + edges), so 5,000-node graphs lay out in a few tens of milliseconds. Both give the
 * same positions for the same input and put every edge of an acyclic graph pointing down.
 */

import * as dagre from '@dagrejs/dagre';

export const NODE_WIDTH = 184;
export const NODE_HEIGHT = 40;
export const GAP_X = 24;
export const GAP_Y = 36;
export const MARGIN = 16;
/** Above this many nodes the layered layout replaces dagre. */
export const DAGRE_LIMIT = 1500;
/** Barycenter sweeps (each down then up) of the layered layout. */
export const SWEEPS = 3;

export interface Point {
  x: number;
  y: number;
}

export interface Layout {
  /** Centre of every node box. */
  positions: Map<string, Point>;
  width: number;
  height: number;
  method: 'dagre' | 'layered';
}

export type EdgePair = readonly [string, string];

function bounds(positions: Map<string, Point>, method: Layout['method']): Layout {
  let width = 0;
  let height = 0;
  for (const { x, y } of positions.values()) {
    width = Math.max(width, x + NODE_WIDTH / 2 + MARGIN);
    height = Math.max(height, y + NODE_HEIGHT / 2 + MARGIN);
  }
  return { positions, width, height, method };
}

function dagreLayout(ids: readonly string[], edges: readonly EdgePair[]): Layout {
  const graph = new dagre.graphlib.Graph({ multigraph: true });
  graph.setGraph({ rankdir: 'TB', nodesep: GAP_X, ranksep: GAP_Y, marginx: MARGIN, marginy: MARGIN });
  graph.setDefaultEdgeLabel(() => ({}));
  for (const id of ids) {
    graph.setNode(id, { width: NODE_WIDTH, height: NODE_HEIGHT });
  }
  edges.forEach(([source, target], index) => {
    graph.setEdge(source, target, {}, String(index));
  });
  dagre.layout(graph);
  const positions = new Map<string, Point>();
  for (const id of ids) {
    const { x, y } = graph.node(id);
    positions.set(id, { x, y });
  }
  return bounds(positions, 'dagre');
}

/**
 * Longest-path layer of every node: 0 for sources, else 1 + the deepest predecessor. A cycle
 * is broken by releasing the earliest (in `ids` order) node still waiting.
 */
export function layersOf(ids: readonly string[], edges: readonly EdgePair[]): Map<string, number> {
  const order = new Map(ids.map((id, index) => [id, index]));
  const successors = new Map<string, string[]>(ids.map(id => [id, []]));
  const waiting = new Map<string, number>(ids.map(id => [id, 0]));
  for (const [source, target] of edges) {
    if (source !== target && order.has(source) && order.has(target)) {
      successors.get(source)!.push(target);
      waiting.set(target, waiting.get(target)! + 1);
    }
  }
  const layer = new Map<string, number>(ids.map(id => [id, 0]));
  const done = new Set<string>();
  let ready = ids.filter(id => waiting.get(id) === 0);
  let scan = 0; // ids before `scan` are all done (cycle breaking looks from there)
  while (done.size < ids.length) {
    if (ready.length === 0) {
      while (done.has(ids[scan])) {
        scan++;
      }
      ready = [ids[scan]];
    }
    ready.sort((a, b) => order.get(a)! - order.get(b)!);
    const next: string[] = [];
    for (const node of ready) {
      if (done.has(node)) {
        continue;
      }
      done.add(node);
      for (const target of successors.get(node)!) {
        if (done.has(target)) {
          continue; // the back edge of a broken cycle
        }
        layer.set(target, Math.max(layer.get(target)!, layer.get(node)! + 1));
        const left = waiting.get(target)! - 1;
        waiting.set(target, left);
        if (left === 0) {
          next.push(target);
        }
      }
    }
    ready = next;
  }
  return layer;
}

function layeredLayout(ids: readonly string[], edges: readonly EdgePair[]): Layout {
  const layer = layersOf(ids, edges);
  let depth = 0;
  for (const value of layer.values()) {
    depth = Math.max(depth, value + 1);
  }
  const rows: string[][] = Array.from({ length: depth }, () => []);
  for (const id of ids) {
    rows[layer.get(id)!].push(id);
  }
  const predecessors = new Map<string, string[]>(ids.map(id => [id, []]));
  const successors = new Map<string, string[]>(ids.map(id => [id, []]));
  for (const [source, target] of edges) {
    if (source !== target && layer.has(source) && layer.has(target)) {
      predecessors.get(target)!.push(source);
      successors.get(source)!.push(target);
    }
  }
  const slot = new Map<string, number>();
  rows.forEach(row => row.forEach((id, index) => slot.set(id, index)));
  const sweep = (index: number, neighbours: Map<string, string[]>): void => {
    const row = rows[index];
    const keys = row.map((id, position) => {
      const linked = neighbours.get(id)!;
      if (linked.length === 0) {
        return { id, centre: position, position };
      }
      let sum = 0;
      for (const other of linked) {
        sum += slot.get(other)!;
      }
      return { id, centre: sum / linked.length, position };
    });
    keys.sort((a, b) => a.centre - b.centre || a.position - b.position);
    keys.forEach((key, position) => {
      row[position] = key.id;
      slot.set(key.id, position);
    });
  };
  for (let round = 0; round < SWEEPS; round++) {
    for (let index = 1; index < rows.length; index++) {
      sweep(index, predecessors);
    }
    for (let index = rows.length - 2; index >= 0; index--) {
      sweep(index, successors);
    }
  }
  const pitchX = NODE_WIDTH + GAP_X;
  const pitchY = NODE_HEIGHT + GAP_Y;
  const widest = Math.max(0, ...rows.map(row => row.length));
  const positions = new Map<string, Point>();
  rows.forEach((row, rowIndex) => {
    const offset = ((widest - row.length) * pitchX) / 2;
    row.forEach((id, index) => {
      positions.set(id, {
        x: MARGIN + offset + index * pitchX + NODE_WIDTH / 2,
        y: MARGIN + rowIndex * pitchY + NODE_HEIGHT / 2
      });
    });
  });
  return bounds(positions, 'layered');
}

/**
 * Positions of `ids` (duplicates ignored) with `edges` between them (edges naming unknown
 * nodes and self-loops are ignored). Same input, same output.
 */
export function layoutGraph(
  ids: readonly string[],
  edges: readonly EdgePair[],
  options: { dagreLimit?: number } = {}
): Layout {
  const unique = [...new Set(ids)];
  const known = new Set(unique);
  const kept = edges.filter(([s, t]) => s !== t && known.has(s) && known.has(t));
  const limit = options.dagreLimit ?? DAGRE_LIMIT;
  return unique.length <= limit ? dagreLayout(unique, kept) : layeredLayout(unique, kept);
}

/** A vertical cubic curve from the bottom of the source box to the top of the target box. */
export function edgePath(source: Point, target: Point): string {
  const x1 = source.x;
  const y1 = source.y + NODE_HEIGHT / 2;
  const x2 = target.x;
  const y2 = target.y - NODE_HEIGHT / 2;
  const middle = (y1 + y2) / 2;
  const f = (v: number): string => v.toFixed(1);
  return `M${f(x1)},${f(y1)} C${f(x1)},${f(middle)} ${f(x2)},${f(middle)} ${f(x2)},${f(y2)}`;
}
