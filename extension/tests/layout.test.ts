import { describe, expect, it } from 'vitest';

import { layersOf, layoutGraph, NODE_HEIGHT } from '../src/layout';
import type { EdgePair, Layout } from '../src/layout';
import { parsePayload, visibleAt } from '../src/schema';
import { bigPayload, fixture, HAS_FIXTURES, syntheticPayload } from './fixtures';
import type { SessionPayload } from '../src/schema';

function graphAt(payload: SessionPayload, k: number): { ids: string[]; edges: EdgePair[] } {
  const { nodes, edges } = visibleAt(payload, k);
  return { ids: nodes.map(n => n.id), edges: edges.map(e => [e.source, e.target] as const) };
}

function coordinates(layout: Layout): Array<[string, number, number]> {
  return [...layout.positions].map(([id, p]) => [id, p.x, p.y]);
}

function expectDownward(layout: Layout, edges: readonly EdgePair[]): void {
  for (const [source, target] of edges) {
    const from = layout.positions.get(source)!;
    const to = layout.positions.get(target)!;
    expect(to.y - from.y, `${source} -> ${target}`).toBeGreaterThanOrEqual(NODE_HEIGHT);
  }
}

describe('layout', () => {
  it('is deterministic and points every edge down (dagre and layered)', () => {
    const { ids, edges } = graphAt(syntheticPayload(), 0);
    for (const dagreLimit of [1500, 0]) {
      const first = layoutGraph(ids, edges, { dagreLimit });
      const second = layoutGraph([...ids], edges.map(e => [e[0], e[1]] as const), { dagreLimit });
      expect(first.method).toBe(dagreLimit ? 'dagre' : 'layered');
      expect(coordinates(second)).toEqual(coordinates(first));
      expectDownward(first, edges);
    }
  });

  it('uses the layered layout above 1500 nodes and keeps it deterministic at 5,000', () => {
    const payload = bigPayload(1000);
    const { ids, edges } = graphAt(payload, 0);
    expect(ids.length).toBe(5001);
    const first = layoutGraph(ids, edges);
    expect(first.method).toBe('layered');
    expect(coordinates(layoutGraph(ids, edges))).toEqual(coordinates(first));
    expectDownward(first, edges);
  });

  it('breaks cycles instead of looping, and ignores self-loops and unknown ends', () => {
    const layer = layersOf(['a', 'b', 'c'], [['a', 'b'], ['b', 'c'], ['c', 'a'], ['a', 'a'], ['a', 'zz']]);
    expect([...layer.values()]).toEqual([0, 1, 2]);
    const layout = layoutGraph(['a', 'b', 'c'], [['a', 'b'], ['b', 'c'], ['c', 'a']], { dagreLimit: 0 });
    expect(layout.positions.size).toBe(3);
  });
});

describe.skipIf(!HAS_FIXTURES)('layout of the real ResNet', () => {
  it('gives the same coordinates twice and downward edges at every few positions', () => {
    const payload = parsePayload(fixture('resnet.json'));
    for (let k = 0; k <= payload.steps.length; k += 4) {
      const { ids, edges } = graphAt(payload, k);
      const layout = layoutGraph(ids, edges);
      expect(coordinates(layoutGraph(ids, edges))).toEqual(coordinates(layout));
      expectDownward(layout, edges);
      expectDownward(layoutGraph(ids, edges, { dagreLimit: 0 }), edges);
    }
  });
});
