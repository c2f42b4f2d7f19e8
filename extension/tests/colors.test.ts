import { describe, expect, it } from 'vitest';

import { familyColor, nodeColors, PALETTE, precisionColor, scaleColor } from '../src/colors';
import { parsePayload, visibleAt } from '../src/schema';
import { fixture, HAS_FIXTURES, syntheticPayload } from './fixtures';
import type { Expected } from './fixtures';

describe('palette helpers', () => {
  it('maps families (with aliases) and precisions, neutral when unknown', () => {
    expect(familyColor('conv')).toBe(PALETTE.family['conv']);
    expect(familyColor('quantize')).toBe(PALETTE.family['quantization']);
    expect(familyColor('nonsense')).toBe(PALETTE.neutral);
    expect(precisionColor('FP16')).toBe(PALETTE.precision['fp16']);
    expect(precisionColor('fp64')).toBe(PALETTE.neutral);
  });

  it('samples scales at and between stops, clamped', () => {
    expect(scaleColor(PALETTE.latency_scale, 0)).toBe('#440154');
    expect(scaleColor(PALETTE.latency_scale, 1)).toBe('#FDE725');
    expect(scaleColor(PALETTE.latency_scale, 7)).toBe('#FDE725');
    expect(scaleColor(PALETTE.error_scale, -1)).toBe('#2166AC');
  });

  it('colours the synthetic graph by each overlay', () => {
    const payload = syntheticPayload();
    const shown = visibleAt(payload, 2).nodes;
    expect(nodeColors(shown, payload.layers, 'precision').fills.get('fused')).toBe(PALETTE.precision['fp16']);
    expect(nodeColors(shown, payload.layers, 'precision').fills.get('input:x')).toBe(PALETTE.neutral);
    expect(nodeColors(shown, payload.layers, 'latency').fills.get('fused')).toBe('#FDE725');
    expect(nodeColors(shown, payload.layers, 'family').legend.map(([label]) => label)).toEqual(['conv', 'io']);
  });
});

describe.skipIf(!HAS_FIXTURES)('palette and overlays agree with Python', () => {
  it('PALETTE equals studio.colors.palette_json()', () => {
    const { samples, ...palette } = fixture<Record<string, unknown>>('palette.json');
    expect(samples).toBeDefined();
    expect(JSON.parse(JSON.stringify(PALETTE))).toEqual(palette);
  });

  it('scaleColor equals studio.colors.scale_color', () => {
    const { samples } = fixture<{ samples: Record<'latency' | 'error', Array<[number, string]>> }>('palette.json');
    for (const [position, color] of samples.latency) {
      expect(scaleColor(PALETTE.latency_scale, position)).toBe(color);
    }
    for (const [position, color] of samples.error) {
      expect(scaleColor(PALETTE.error_scale, position)).toBe(color);
    }
  });

  it('node fills and legends equal studio.graph_svg for every overlay', () => {
    const payload = parsePayload(fixture('resnet.json'));
    const expected = fixture<Expected>('resnet_expected.json').overlays_at_last_step;
    const shown = visibleAt(payload, payload.steps.length).nodes;
    for (const overlay of ['family', 'precision', 'latency', 'error'] as const) {
      const { fills, legend } = nodeColors(shown, payload.layers, overlay);
      expect(Object.fromEntries(fills)).toEqual(expected[overlay].fills);
      expect(legend).toEqual(expected[overlay].legend);
    }
  });
});
