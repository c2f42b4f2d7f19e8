import { describe, expect, it } from 'vitest';

import { provenanceText } from '../src/timeline';
import { syntheticPayload } from './fixtures';

describe('provenance text of a step', () => {
  it('names the constants a node-less step dropped', () => {
    const payload = syntheticPayload();
    payload.steps.push({
      index: payload.steps.length,
      pass: 'dead_code_elimination',
      rule: null,
      removed: [],
      added: [],
      provenance: {},
      initializers_removed: ['bn.bias', 'bn.mean', 'bn.var', 'bn.scale'],
    });
    const text = provenanceText(payload, payload.steps.length);
    expect(text).toContain('dropped 4 unused constant(s): bn.bias, bn.mean, bn.var, ...');
    expect(text).toContain('dead_code_elimination');
    expect(text).not.toContain('removed nothing');
  });

  it('says when a step changed no node and no constant', () => {
    const payload = syntheticPayload();
    payload.steps.push({
      index: payload.steps.length,
      pass: 'cleanup',
      rule: null,
      removed: [],
      added: [],
      provenance: {},
    });
    expect(provenanceText(payload, payload.steps.length)).toContain('changed no node');
  });
});
