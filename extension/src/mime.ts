/**
 * The MIME renderer for application/vnd.gie.session+json: the session view from the payload
 * alone (read-only, no kernel needed, so a saved notebook shows the graph and timeline). The
 * timeline, overlay and selection work locally; nothing is sent anywhere.
 */

import type { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { Widget } from '@lumino/widgets';

import { StudioView } from './graph';
import { MIME_TYPE, parsePayload } from './schema';

export const RENDERER_CLASS = 'gie-studio-mime';

/** Renders one session payload; a payload that fails validation shows its error as text. */
export class SessionRenderer extends Widget implements IRenderMime.IRenderer {
  private readonly view: StudioView;

  constructor(private readonly mimeType: string = MIME_TYPE) {
    super();
    this.addClass(RENDERER_CLASS);
    this.view = new StudioView({ editable: false });
  }

  renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    try {
      const payload = parsePayload(model.data[this.mimeType]);
      this.view.setOverlay(payload.overlay);
      this.view.setPayload(payload);
      if (!this.node.contains(this.view.node)) {
        this.node.replaceChildren(this.view.node);
      }
    } catch (error) {
      const message = document.createElement('pre');
      message.className = 'gie-error';
      message.textContent = `GIE Studio cannot show this output: ${(error as Error).message}`;
      this.node.replaceChildren(message);
    }
    return Promise.resolve();
  }

  protected onAfterAttach(): void {
    this.view.fit(false);
  }

  dispose(): void {
    this.view.dispose();
    super.dispose();
  }
}

export const rendererFactory: IRenderMime.IRendererFactory = {
  safe: true,
  mimeTypes: [MIME_TYPE],
  defaultRank: 0,
  createRenderer: options => new SessionRenderer(options.mimeType)
};

const extension: IRenderMime.IExtension = {
  id: 'gie-studio:mime',
  description: 'Renders GIE Studio sessions (application/vnd.gie.session+json).',
  rendererFactory,
  rank: 0,
  dataType: 'json'
};

export default extension;
