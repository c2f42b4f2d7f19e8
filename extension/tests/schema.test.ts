import { describe, expect, it } from 'vitest';

import { parsePayload, PayloadError, stepView, visibleAt } from '../src/schema';
import type { SessionPayload } from '../src/schema';
import { fixture, HAS_FIXTURES, syntheticPayload } from './fixtures';
import type { Expected } from './fixtures';

function clone<T>(value: T): T {
  return JSON.parse(JSON.stringify(value)) as T;
}

function errorOf(json: unknown): PayloadError {
  try {
    parsePayload(json);
  } catch (error) {
    expect(error).toBeInstanceOf(PayloadError);
    return error as PayloadError;
  }
  throw new Error('parsePayload accepted an invalid payload');
}

describe('parsePayload (synthetic)', () => {
  it('accepts a valid payload and keeps its content', () => {
    const payload = parsePayload(clone(syntheticPayload()));
    expect(payload.nodes).toHaveLength(7);
    expect(payload.steps[0].provenance['fused']).toEqual(['conv', 'bn', 'relu']);
    expect(payload.current_step).toBe(2);
  });

  it('names the path of a missing required field', () => {
    const data = clone(syntheticPayload()) as unknown as { nodes: Array<Record<string, unknown>> };
    delete data.nodes[3]['born'];
    const error = errorOf(data);
    expect(error.path).toBe('nodes/3/born');
    expect(error.message).toBe('payload nodes/3/born: required field "born" is missing');
  });

  it('names the path of a field of the wrong type', () => {
    const data = clone(syntheticPayload()) as unknown as { edges: Array<Record<string, unknown>> };
    data.edges[2]['died'] = 'soon';
    expect(errorOf(data).message).toMatch(/^payload edges\/2\/died: expected an integer >= 0, got "soon"/);
  });

  it('refuses another schema version', () => {
    const error = errorOf({ ...clone(syntheticPayload()), version: 2 });
    expect(error.path).toBe('version');
    expect(error.message).toContain('schema version 2 is not supported');
  });

  it('refuses a missing top-level field, edges to unknown nodes and a step beyond the steps', () => {
    const data = clone(syntheticPayload()) as unknown as Record<string, unknown>;
    delete data['steps'];
    expect(errorOf(data).message).toBe('payload steps: required field "steps" is missing');
    const ghost = clone(syntheticPayload());
    ghost.edges[0].target = 'ghost';
    expect(errorOf(ghost).message).toBe('payload edges/0/target: no node "ghost"');
    expect(errorOf({ ...clone(syntheticPayload()), current_step: 3 }).path).toBe('current_step');
    expect(errorOf([]).message).toContain('expected an object');
  });
});

describe('visibleAt and stepView (synthetic)', () => {
  const payload = syntheticPayload();

  it('shows a node when born < k and (died is null or died >= k)', () => {
    expect(visibleAt(payload, 0).nodes.map(n => n.id)).toEqual(['input:x', 'conv', 'bn', 'relu', 'dead', 'output:y']);
    expect(visibleAt(payload, 1).nodes.map(n => n.id)).toEqual(['input:x', 'dead', 'fused', 'output:y']);
    expect(visibleAt(payload, 2).nodes.map(n => n.id)).toEqual(['input:x', 'fused', 'output:y']);
    expect(visibleAt(payload, 2).edges).toHaveLength(2);
  });

  it('adds the ghosts of the current step and marks what it added', () => {
    const view = stepView(payload, 1);
    expect([...view.removed]).toEqual(['conv', 'bn', 'relu']);
    expect([...view.added]).toEqual(['fused']);
    expect(view.nodes.map(n => n.id)).toEqual(['input:x', 'conv', 'bn', 'relu', 'dead', 'fused', 'output:y']);
    expect(view.step?.rule).toBe('conv_bn_act');
    expect(stepView(payload, 0).removed.size).toBe(0);
  });
});

describe.skipIf(!HAS_FIXTURES)('real ResNet session payload', () => {
  it('parses and agrees with Python on visibility, ghosts and additions at every position', () => {
    const raw = fixture<SessionPayload>('resnet.json');
    const expected = fixture<Expected>('resnet_expected.json');
    const payload = parsePayload(raw);
    expect(payload.nodes.length).toBe(raw.nodes.length);
    expect(payload.steps.length).toBeGreaterThan(10);
    expect(Object.keys(payload.layers).length).toBeGreaterThan(5);
    for (let k = 0; k <= payload.steps.length; k++) {
      expect(visibleAt(payload, k).nodes.map(n => n.id)).toEqual(expected.visible[String(k)]);
      const view = stepView(payload, k);
      expect([...view.removed].sort()).toEqual([...expected.removed[String(k)]].sort());
      expect([...view.added].sort()).toEqual([...expected.added[String(k)]].sort());
    }
  });

  it('names the path when a real node loses a field', () => {
    const raw = fixture<{ nodes: Array<Record<string, unknown>> }>('resnet.json');
    delete raw.nodes[5]['origins'];
    expect(errorOf(raw).message).toBe('payload nodes/5/origins: required field "origins" is missing');
  });

  it('parses the hostile-name payload unchanged', () => {
    const payload = parsePayload(fixture('hostile.json'));
    expect(payload.nodes.some(n => n.id === '<img src=x onerror=alert(1)>')).toBe(true);
  });
});
