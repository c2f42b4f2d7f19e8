/** GIE Studio's JupyterLab extension: the session view, its MIME renderer and widget view. */

export { MODULE_NAME, MODULE_VERSION } from './version';
export { PALETTE, familyColor, nodeColors, precisionColor, scaleColor } from './colors';
export { layoutGraph, DAGRE_LIMIT } from './layout';
export { StudioView } from './graph';
export { MIME_TYPE, PayloadError, SCHEMA_VERSION, parsePayload, stepView, visibleAt } from './schema';
export type { SessionPayload, SessionNode, SessionEdge, SessionStep, LayerFacts, Overlay } from './schema';
export { provenanceText, stepLabel } from './timeline';
