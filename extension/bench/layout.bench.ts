/**
 * Layout and render timings (printed, never asserted): `npm run bench`.
 *
 * dagre at the largest size it handles (1,500 nodes), the layered layout at 5,000 nodes, and a
 * full StudioView render (layout + SVG DOM for every node and edge) of 5,000 nodes in jsdom.
 * jsdom is slower than a browser's DOM, so the render figure is an upper bound.
 */

import { bench, describe } from 'vitest';

import { StudioView } from '../src/graph';
import { layoutGraph } from '../src/layout';
import { visibleAt } from '../src/schema';
import { bigPayload } from '../tests/fixtures';

function graph(blocks: number): { ids: string[]; edges: Array<readonly [string, string]> } {
  const { nodes, edges } = visibleAt(bigPayload(blocks), 0);
  return { ids: nodes.map(n => n.id), edges: edges.map(e => [e.source, e.target] as const) };
}

const small = graph(300); // 1,501 nodes: dagre's limit is 1,500, so 299 blocks
const dagreSized = graph(299);
const big = graph(1000); // 5,001 nodes

describe('layout', () => {
  bench(`dagre, ${dagreSized.ids.length} nodes`, () => {
    layoutGraph(dagreSized.ids, dagreSized.edges);
  }, { iterations: 3, time: 0 });
  bench(`layered, ${small.ids.length} nodes`, () => {
    layoutGraph(small.ids, small.edges);
  }, { iterations: 5, time: 0 });
  bench(`layered, ${big.ids.length} nodes`, () => {
    layoutGraph(big.ids, big.edges);
  }, { iterations: 5, time: 0 });
});

describe('render', () => {
  const payload = bigPayload(1000);
  bench(`StudioView layout + SVG of ${big.ids.length} nodes (jsdom)`, () => {
    const view = new StudioView();
    view.setPayload(payload, 0);
  }, { iterations: 3, time: 0 });
});
