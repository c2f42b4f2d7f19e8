/**
 * Fixtures written by tests/test_extension_unit.py from real sessions, read from the folder
 * named by GIE_EXTENSION_FIXTURES (only the tests read it). Without it, the tests that need
 * them are skipped and the synthetic payload below still exercises everything else.
 */

import { readFileSync } from 'node:fs';
import { join } from 'node:path';

import type { SessionPayload } from '../src/schema';

export const FIXTURE_DIR = process.env.GIE_EXTENSION_FIXTURES ?? '';
export const HAS_FIXTURES = FIXTURE_DIR !== '';
export const HOSTILE = '<img src=x onerror=alert(1)>';

/** The JSON of fixture `name` (e.g. "resnet.json"). */
export function fixture<T = unknown>(name: string): T {
  return JSON.parse(readFileSync(join(FIXTURE_DIR, name), 'utf-8')) as T;
}

export interface Expected {
  visible: Record<string, string[]>;
  removed: Record<string, string[]>;
  added: Record<string, string[]>;
  overlays_at_last_step: Record<string, { fills: Record<string, string>; legend: Array<[string, string]> }>;
}

function node(id: string, op: string, family: string, born: number, died: number | null, origins: string[] = [id]) {
  return { id, op, domain: '', family, born, died, origins, rule: null, attributes: {}, outputs: [`${id}_out`], why_not: [] as string[] };
}

/**
 * A small session: input -> Conv -> BatchNormalization -> Relu -> output, where step 0 fuses
 * the middle three into "fused" (rule conv_bn_act) and step 1 renames nothing but removes a
 * dead Identity. Written by hand in the payload format of studio/schema.py.
 */
export function syntheticPayload(): SessionPayload {
  const fused = { ...node('fused', 'ConvAct', 'conv', 0, null, ['conv', 'bn', 'relu']), domain: 'gie', rule: 'conv_bn_act' };
  return {
    schema: 'gie.session',
    version: 1,
    title: 'synthetic',
    inputs: [{ name: 'x', dtype: 'float32', shape: [1, 3, 8, 8] }],
    outputs: [{ name: 'y', dtype: 'float32', shape: [1, 4, 8, 8] }],
    nodes: [
      node('input:x', 'Input', 'io', -1, null, []),
      node('conv', 'Conv', 'conv', -1, 0),
      node('bn', 'BatchNormalization', 'normalization', -1, 0),
      node('relu', 'Relu', 'activation', -1, 0),
      node('dead', 'Identity', 'misc', -1, 1),
      fused,
      node('output:y', 'Output', 'io', -1, null, [])
    ],
    edges: [
      { source: 'input:x', target: 'conv', value: 'x', born: -1, died: 0 },
      { source: 'conv', target: 'bn', value: 'c', born: -1, died: 0 },
      { source: 'bn', target: 'relu', value: 'b', born: -1, died: 0 },
      { source: 'relu', target: 'output:y', value: 'y', born: -1, died: 0 },
      { source: 'input:x', target: 'fused', value: 'x', born: 0, died: null },
      { source: 'fused', target: 'output:y', value: 'y', born: 0, died: null },
      { source: 'input:x', target: 'dead', value: 'x', born: -1, died: 1 }
    ],
    steps: [
      {
        index: 0, pass: 'epilogue', rule: 'conv_bn_act', removed: ['conv', 'bn', 'relu'], added: ['fused'],
        provenance: { fused: ['conv', 'bn', 'relu'] }
      },
      { index: 1, pass: 'cleanup', rule: 'remove_dead', removed: ['dead'], added: [], provenance: {} }
    ],
    current_step: 2,
    layers: {
      fused: {
        op: 'gie::ConvAct', precision: 'fp16', precision_reason: 'fastest', role: 'compute', tactic: 'im2col',
        origins: ['conv', 'bn', 'relu'], latency_ms: 0.5, cosine: 0.999,
        candidates: [
          { tactic: 'im2col', median_ms: 0.5, samples: 3, aborted: false },
          { tactic: 'direct', median_ms: 0.9, samples: 1, aborted: true }
        ],
        scales: [0.5, 0.25]
      }
    },
    engine: null,
    overlay: 'family'
  };
}

/**
 * A layered graph of `blocks` repeated residual blocks (about 5 nodes each), all born in the
 * original graph: the shape of a big CNN for layout and rendering benchmarks.
 */
export function bigPayload(blocks: number): SessionPayload {
  const base = syntheticPayload();
  const nodes: SessionPayload['nodes'] = [node('input:x', 'Input', 'io', -1, null, [])];
  const edges: SessionPayload['edges'] = [];
  let previous = 'input:x';
  const edge = (source: string, target: string) => edges.push({ source, target, value: `${source}->${target}`, born: -1, died: null });
  for (let b = 0; b < blocks; b++) {
    const ids = [`b${b}/conv1`, `b${b}/relu1`, `b${b}/conv2`, `b${b}/add`, `b${b}/relu2`];
    nodes.push(
      node(ids[0], 'Conv', 'conv', -1, null),
      node(ids[1], 'Relu', 'activation', -1, null),
      node(ids[2], 'Conv', 'conv', -1, null),
      node(ids[3], 'Add', 'elementwise', -1, null),
      node(ids[4], 'Relu', 'activation', -1, null)
    );
    edge(previous, ids[0]);
    edge(ids[0], ids[1]);
    edge(ids[1], ids[2]);
    edge(ids[2], ids[3]);
    edge(previous, ids[3]);
    edge(ids[3], ids[4]);
    previous = ids[4];
  }
  return { ...base, title: `big ${blocks}`, nodes, edges, steps: [], current_step: 0, layers: {} };
}
