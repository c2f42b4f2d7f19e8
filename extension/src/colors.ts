/**
 * The one colour palette of GIE Studio, mirrored from studio/colors.py palette_json() (a unit
 * test compares PALETTE with the JSON the Python side writes), and the overlay colouring.
 */

import type { LayerFacts, Overlay, SessionNode } from './schema';

export type Scale = ReadonlyArray<readonly [number, string]>;

export interface Palette {
  version: number;
  neutral: string;
  precision: Readonly<Record<string, string>>;
  family: Readonly<Record<string, string>>;
  family_aliases: Readonly<Record<string, string>>;
  calibrator: Readonly<Record<string, string>>;
  categorical: readonly string[];
  latency_scale: Scale;
  error_scale: Scale;
}

export const PALETTE: Palette = {
  version: 1,
  neutral: '#BBBBBB',
  precision: {
    fp32: '#0072B2',
    tf32: '#56B4E9',
    fp16: '#009E73',
    int8: '#E69F00',
    reformat: '#CC79A7'
  },
  family: {
    conv: '#332288',
    linalg: '#88CCEE',
    elementwise: '#DDCC77',
    activation: '#117733',
    normalization: '#44AA99',
    pool: '#999933',
    reduce: '#AA4499',
    quantization: '#CC6677',
    fused: '#882255',
    attention: '#EE7733',
    gie_transformer: '#EE7733',
    resize: '#0077BB',
    rnn: '#009988',
    io: '#555555',
    shape: '#A5A5A5',
    indexing: '#A5A5A5',
    control_flow: '#8C8C8C',
    sequence: '#D0D0D0',
    generator: '#D0D0D0',
    signal: '#D0D0D0',
    string: '#D0D0D0',
    classic_ml: '#D0D0D0',
    training: '#D0D0D0',
    loss: '#D0D0D0',
    detection: '#D0D0D0',
    misc: '#D0D0D0'
  },
  family_aliases: {
    quantize: 'quantization',
    transformer: 'gie_transformer'
  },
  calibrator: {
    minmax: '#D55E00',
    percentile: '#0072B2',
    entropy: '#009E73',
    mse: '#CC79A7'
  },
  categorical: ['#E69F00', '#56B4E9', '#009E73', '#F0E442', '#0072B2', '#D55E00', '#CC79A7', '#000000'],
  latency_scale: [
    [0.0, '#440154'],
    [0.25, '#3B528B'],
    [0.5, '#21918C'],
    [0.75, '#5EC962'],
    [1.0, '#FDE725']
  ],
  error_scale: [
    [0.0, '#2166AC'],
    [0.25, '#67A9CF'],
    [0.5, '#F7F7F7'],
    [0.75, '#EF8A62'],
    [1.0, '#B2182B']
  ]
};

/** Cosine similarity vs fp32 mapped to the far end of the error scale (as studio/graph_svg.py). */
export const WORST_COSINE = 0.9;

/** The colour of a precision (`reformat` for conversion layers); neutral when unknown. */
export function precisionColor(name: string): string {
  return PALETTE.precision[name.toLowerCase()] ?? PALETTE.neutral;
}

/** The colour of an op family (aliases accepted); neutral when unknown. */
export function familyColor(name: string): string {
  const key = name.toLowerCase();
  return PALETTE.family[PALETTE.family_aliases[key] ?? key] ?? PALETTE.neutral;
}

function rgb(color: string): [number, number, number] {
  const text = color.replace('#', '');
  return [0, 2, 4].map(i => parseInt(text.slice(i, i + 2), 16)) as [number, number, number];
}

/** The colour at `position` (clamped to [0, 1]) of a scale, linear in RGB between stops. */
export function scaleColor(scale: Scale, position: number): string {
  const t = Math.min(Math.max(Number.isFinite(position) ? position : 0, 0), 1);
  for (let i = 0; i + 1 < scale.length; i++) {
    const [low, lowColor] = scale[i];
    const [high, highColor] = scale[i + 1];
    if (t <= high) {
      const span = high - low;
      const weight = span <= 0 ? 0 : (t - low) / span;
      const a = rgb(lowColor);
      const b = rgb(highColor);
      const mixed = a.map((x, c) => Math.round(x + (b[c] - x) * weight));
      return '#' + mixed.map(v => v.toString(16).toUpperCase().padStart(2, '0')).join('');
    }
  }
  return scale[scale.length - 1][1];
}

/** Black or white, whichever reads better on `fill` (`#RRGGBB`). */
export function textColor(fill: string): string {
  const [red, green, blue] = rgb(fill);
  if ([red, green, blue].some(Number.isNaN)) {
    return '#000000';
  }
  return 0.299 * red + 0.587 * green + 0.114 * blue > 140 ? '#000000' : '#FFFFFF';
}

export interface Coloring {
  fills: Map<string, string>;
  legend: Array<[string, string]>;
}

/** `value` as Python's `f"{value:.3g}"` writes it (the legend labels match studio/graph_svg). */
export function formatG(value: number, digits = 3): string {
  if (value === 0 || !Number.isFinite(value)) {
    return value === 0 ? '0' : String(value);
  }
  const exponent = Math.floor(Math.log10(Math.abs(Number(value.toPrecision(digits)))));
  if (exponent < -4 || exponent >= digits) {
    const [mantissa, power] = value.toExponential(digits - 1).split('e');
    const trimmed = mantissa.includes('.') ? mantissa.replace(/\.?0+$/, '') : mantissa;
    const sign = power.startsWith('-') ? '-' : '+';
    return `${trimmed}e${sign}${power.replace(/^[-+]/, '').padStart(2, '0')}`;
  }
  return Number(value.toPrecision(digits)).toString();
}

function finite(value: unknown): value is number {
  return typeof value === 'number' && Number.isFinite(value);
}

/** Fill colour per node id and the legend (label, colour) for an overlay (as graph_svg.py). */
export function nodeColors(
  nodes: readonly SessionNode[],
  layers: Readonly<Record<string, LayerFacts>>,
  overlay: Overlay
): Coloring {
  const fills = new Map<string, string>();
  let legend = new Map<string, string>();
  if (overlay === 'family') {
    for (const node of nodes) {
      const color = familyColor(node.family);
      fills.set(node.id, color);
      legend.set(node.family, color);
    }
  } else if (overlay === 'precision') {
    for (const node of nodes) {
      const facts = layers[node.id];
      if (facts === undefined) {
        fills.set(node.id, PALETTE.neutral);
        continue;
      }
      const label = facts.role === 'reformat' ? 'reformat' : String(facts.precision);
      const color = precisionColor(label);
      fills.set(node.id, color);
      legend.set(label, color);
    }
  } else {
    const key = overlay === 'latency' ? 'latency_ms' : 'cosine';
    const values = new Map<string, number>();
    for (const node of nodes) {
      const value = layers[node.id]?.[key];
      if (finite(value)) {
        values.set(node.id, value);
      }
    }
    const slowest = Math.max(0, ...values.values());
    for (const node of nodes) {
      const value = values.get(node.id);
      let color = PALETTE.neutral;
      if (value !== undefined && overlay === 'latency') {
        color = scaleColor(PALETTE.latency_scale, slowest ? value / slowest : 0);
      } else if (value !== undefined) {
        color = scaleColor(PALETTE.error_scale, (1 - value) / (1 - WORST_COSINE));
      }
      fills.set(node.id, color);
    }
    const first = (scale: Scale): string => scale[0][1];
    const last = (scale: Scale): string => scale[scale.length - 1][1];
    legend =
      overlay === 'latency'
        ? new Map([
            ['fastest', first(PALETTE.latency_scale)],
            [`${formatG(slowest)} ms`, last(PALETTE.latency_scale)]
          ])
        : new Map([
            ['cosine 1', first(PALETTE.error_scale)],
            [`cosine ≤ ${WORST_COSINE}`, last(PALETTE.error_scale)]
          ]);
  }
  if (overlay !== 'family' && [...fills.values()].includes(PALETTE.neutral)) {
    if (!legend.has('no data')) {
      legend.set('no data', PALETTE.neutral);
    }
  }
  const sorted = [...legend.entries()].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  return { fills, legend: sorted };
}
