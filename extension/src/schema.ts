/**
 * The session payload (MIME application/vnd.gie.session+json, schema version 1): the types of
 * what studio/schema.py emits, a validating parser and the visibility rule of the timeline.
 *
 * A node or edge is visible after `k` applied steps when `born < k` and (`died` is null or
 * `died >= k`); `born == -1` marks the original graph. At position `k` the current step is
 * step `k - 1`: the nodes it removed have `died == k - 1`, the ones it added `born == k - 1`.
 */

export const MIME_TYPE = 'application/vnd.gie.session+json';
export const SCHEMA_VERSION = 1;
export const OVERLAYS = ['family', 'precision', 'latency', 'error'] as const;
export type Overlay = (typeof OVERLAYS)[number];
export const PRECISION_CHOICES = ['fp32', 'tf32', 'fp16', 'int8'] as const;

export interface TensorInfo {
  name: string;
  dtype: string;
  shape: Array<number | string> | null;
}

export interface SessionNode {
  id: string;
  op: string;
  domain: string;
  family: string;
  born: number;
  died: number | null;
  origins: string[];
  rule: string | null;
  attributes: Record<string, string>;
  outputs: string[];
  why_not: string[];
}

export interface SessionEdge {
  source: string;
  target: string;
  value: string;
  born: number;
  died: number | null;
}

export interface SessionStep {
  index: number;
  pass: string;
  rule: string | null;
  removed: string[];
  added: string[];
  provenance: Record<string, string[]>;
  [key: string]: unknown;
}

export interface Candidate {
  tactic: string;
  median_ms: number | null;
  samples: number;
  aborted: boolean;
}

export interface LayerFacts {
  op?: string;
  precision?: string;
  precision_reason?: string;
  role?: string;
  tactic?: string | null;
  origins?: string[];
  latency_ms?: number | null;
  candidates?: Candidate[];
  cosine?: number | null;
  sqnr_db?: number | null;
  scales?: unknown;
  [key: string]: unknown;
}

export interface SessionPayload {
  schema: 'gie.session';
  version: number;
  title: string;
  inputs: TensorInfo[];
  outputs: TensorInfo[];
  nodes: SessionNode[];
  edges: SessionEdge[];
  steps: SessionStep[];
  current_step: number;
  layers: Record<string, LayerFacts>;
  engine: Record<string, unknown> | null;
  overlay: Overlay;
}

/** A payload that does not follow the schema; the message names the JSON path. */
export class PayloadError extends Error {
  constructor(
    readonly path: string,
    detail: string
  ) {
    super(`payload ${path || '(root)'}: ${detail}`);
    this.name = 'PayloadError';
  }
}

type Json = Record<string, unknown>;

function describe(value: unknown): string {
  if (value === undefined) {
    return 'nothing';
  }
  const text = JSON.stringify(value);
  return text === undefined ? typeof value : text.length > 40 ? `${text.slice(0, 37)}...` : text;
}

function isObject(value: unknown): value is Json {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function object(value: unknown, path: string): Json {
  if (!isObject(value)) {
    throw new PayloadError(path, `expected an object, got ${describe(value)}`);
  }
  return value;
}

function array(value: unknown, path: string): unknown[] {
  if (!Array.isArray(value)) {
    throw new PayloadError(path, `expected an array, got ${describe(value)}`);
  }
  return value;
}

function required(data: Json, key: string, path: string): unknown {
  if (!(key in data)) {
    const where = path ? `${path}/${key}` : key;
    throw new PayloadError(where, `required field "${key}" is missing`);
  }
  return data[key];
}

function string(value: unknown, path: string): string {
  if (typeof value !== 'string') {
    throw new PayloadError(path, `expected a string, got ${describe(value)}`);
  }
  return value;
}

function integer(value: unknown, path: string, minimum: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < minimum) {
    throw new PayloadError(path, `expected an integer >= ${minimum}, got ${describe(value)}`);
  }
  return value;
}

function strings(value: unknown, path: string): string[] {
  return array(value, path).map((item, index) => string(item, `${path}/${index}`));
}

function optional<T>(data: Json, key: string, fallback: T, check: (v: unknown) => T): T {
  return key in data && data[key] !== undefined ? check(data[key]) : fallback;
}

function parseNode(value: unknown, path: string): SessionNode {
  const data = object(value, path);
  const at = (key: string): string => `${path}/${key}`;
  const died = required(data, 'died', path);
  const attributes = optional(data, 'attributes', {}, v => object(v, at('attributes')));
  for (const [key, text] of Object.entries(attributes)) {
    string(text, `${at('attributes')}/${key}`);
  }
  const rule = optional<unknown>(data, 'rule', null, v => v);
  return {
    id: string(required(data, 'id', path), at('id')),
    op: string(required(data, 'op', path), at('op')),
    domain: string(required(data, 'domain', path), at('domain')),
    family: string(required(data, 'family', path), at('family')),
    born: integer(required(data, 'born', path), at('born'), -1),
    died: died === null ? null : integer(died, at('died'), 0),
    origins: strings(required(data, 'origins', path), at('origins')),
    rule: rule === null ? null : string(rule, at('rule')),
    attributes: attributes as Record<string, string>,
    outputs: optional(data, 'outputs', [], v => strings(v, at('outputs'))),
    why_not: optional(data, 'why_not', [], v => strings(v, at('why_not')))
  };
}

function parseEdge(value: unknown, path: string): SessionEdge {
  const data = object(value, path);
  const at = (key: string): string => `${path}/${key}`;
  const died = required(data, 'died', path);
  return {
    source: string(required(data, 'source', path), at('source')),
    target: string(required(data, 'target', path), at('target')),
    value: string(required(data, 'value', path), at('value')),
    born: integer(required(data, 'born', path), at('born'), -1),
    died: died === null ? null : integer(died, at('died'), 0)
  };
}

function parseStep(value: unknown, path: string): SessionStep {
  const data = object(value, path);
  const at = (key: string): string => `${path}/${key}`;
  const rule = data['rule'] ?? null;
  const provenance: Record<string, string[]> = {};
  const given = optional(data, 'provenance', {}, v => object(v, at('provenance')));
  for (const [name, origins] of Object.entries(given)) {
    provenance[name] = strings(origins, `${at('provenance')}/${name}`);
  }
  return {
    ...data,
    index: integer(required(data, 'index', path), at('index'), 0),
    pass: string(required(data, 'pass', path), at('pass')),
    rule: rule === null ? null : string(rule, at('rule')),
    removed: optional(data, 'removed', [], v => strings(v, at('removed'))),
    added: optional(data, 'added', [], v => strings(v, at('added'))),
    provenance
  };
}

function parseTensors(data: Json, key: string): TensorInfo[] {
  return optional(data, key, [], v =>
    array(v, key).map((item, index) => {
      const path = `${key}/${index}`;
      const tensor = object(item, path);
      const shape = required(tensor, 'shape', path);
      return {
        name: string(required(tensor, 'name', path), `${path}/name`),
        dtype: string(required(tensor, 'dtype', path), `${path}/dtype`),
        shape: shape === null ? null : (array(shape, `${path}/shape`) as Array<number | string>)
      };
    })
  );
}

/**
 * Check `json` against schema version 1 and return it typed. Throws {@link PayloadError}
 * naming the path of the first problem (`payload nodes/3/born: ...`), also for edges that
 * name unknown nodes and a `current_step` beyond the recorded steps.
 */
export function parsePayload(json: unknown): SessionPayload {
  const data = object(json, '');
  if (required(data, 'schema', '') !== 'gie.session') {
    throw new PayloadError('schema', `expected "gie.session", got ${describe(data['schema'])}`);
  }
  const version = required(data, 'version', '');
  if (version !== SCHEMA_VERSION) {
    throw new PayloadError(
      'version',
      `schema version ${describe(version)} is not supported (this extension reads version ${SCHEMA_VERSION})`
    );
  }
  const nodes = array(required(data, 'nodes', ''), 'nodes').map((n, i) =>
    parseNode(n, `nodes/${i}`)
  );
  const ids = new Set<string>();
  nodes.forEach((node, index) => {
    if (ids.has(node.id)) {
      throw new PayloadError(`nodes/${index}/id`, `node id ${describe(node.id)} is not unique`);
    }
    ids.add(node.id);
  });
  const edges = array(required(data, 'edges', ''), 'edges').map((e, i) =>
    parseEdge(e, `edges/${i}`)
  );
  edges.forEach((edge, index) => {
    for (const end of ['source', 'target'] as const) {
      if (!ids.has(edge[end])) {
        throw new PayloadError(`edges/${index}/${end}`, `no node ${describe(edge[end])}`);
      }
    }
  });
  const steps = array(required(data, 'steps', ''), 'steps').map((s, i) =>
    parseStep(s, `steps/${i}`)
  );
  const current = integer(required(data, 'current_step', ''), 'current_step', 0);
  if (current > steps.length) {
    throw new PayloadError('current_step', `${current} > ${steps.length} steps`);
  }
  const layers: Record<string, LayerFacts> = {};
  const givenLayers = optional(data, 'layers', {}, v => object(v, 'layers'));
  for (const [name, facts] of Object.entries(givenLayers)) {
    layers[name] = object(facts, `layers/${name}`) as LayerFacts;
  }
  const engine = data['engine'] ?? null;
  const overlay = optional<unknown>(data, 'overlay', 'family', v => v);
  if (!(OVERLAYS as readonly unknown[]).includes(overlay)) {
    throw new PayloadError('overlay', `expected one of ${OVERLAYS.join(', ')}, got ${describe(overlay)}`);
  }
  return {
    schema: 'gie.session',
    version: SCHEMA_VERSION,
    title: string(required(data, 'title', ''), 'title'),
    inputs: parseTensors(data, 'inputs'),
    outputs: parseTensors(data, 'outputs'),
    nodes,
    edges,
    steps,
    current_step: current,
    layers,
    engine: engine === null ? null : object(engine, 'engine'),
    overlay: overlay as Overlay
  };
}

/** Whether a node or edge exists after `k` applied steps. */
export function isVisible(item: { born: number; died: number | null }, k: number): boolean {
  return item.born < k && (item.died === null || item.died >= k);
}

/** The nodes and edges of `payload` visible after `k` applied steps (payload order). */
export function visibleAt(
  payload: SessionPayload,
  k: number
): { nodes: SessionNode[]; edges: SessionEdge[] } {
  return {
    nodes: payload.nodes.filter(node => isVisible(node, k)),
    edges: payload.edges.filter(edge => isVisible(edge, k))
  };
}

/** What position `k` shows: the visible items plus the current step's removed ones (ghosts). */
export interface StepView {
  step: SessionStep | null;
  nodes: SessionNode[];
  edges: SessionEdge[];
  removed: Set<string>;
  added: Set<string>;
}

function edgeKey(edge: SessionEdge): string {
  return `${edge.source}\u0000${edge.target}\u0000${edge.value}`;
}

export { edgeKey };

/**
 * The drawing of position `k`: nodes visible after `k` steps plus the nodes step `k - 1`
 * removed (`died == k - 1`, drawn ghosted), with `added` the ids that step created.
 */
export function stepView(payload: SessionPayload, k: number): StepView {
  const current = k - 1;
  const shown = (item: { born: number; died: number | null }): boolean =>
    isVisible(item, k) || (current >= 0 && item.died === current && item.born < current);
  const nodes = payload.nodes.filter(shown);
  const ids = new Set(nodes.map(node => node.id));
  const edges = payload.edges.filter(
    edge => shown(edge) && ids.has(edge.source) && ids.has(edge.target)
  );
  const removed = new Set<string>();
  const added = new Set<string>();
  if (current >= 0) {
    for (const node of nodes) {
      if (node.died === current) {
        removed.add(node.id);
      } else if (node.born === current) {
        added.add(node.id);
      }
    }
  }
  return { step: current >= 0 ? (payload.steps[current] ?? null) : null, nodes, edges, removed, added };
}
