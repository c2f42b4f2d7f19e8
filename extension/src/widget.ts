/**
 * The ipywidgets model and view of studio.widgets.GraphView (module "gie-studio"). Python owns
 * the state: the view renders `payload` at `step`, and sends intent back through the model
 * (a step, a selected node, an overlay, a precision override), which Python validates.
 */

import { DOMWidgetModel, DOMWidgetView } from '@jupyter-widgets/base';
import type { ISerializers } from '@jupyter-widgets/base';

import { StudioView } from './graph';
import { OVERLAYS, parsePayload } from './schema';
import type { Overlay } from './schema';
import { MODULE_NAME, MODULE_VERSION } from './version';

export class GraphModel extends DOMWidgetModel {
  defaults(): Backbone.ObjectHash {
    return {
      ...super.defaults(),
      _model_name: 'GraphModel',
      _view_name: 'GraphView',
      _model_module: MODULE_NAME,
      _view_module: MODULE_NAME,
      _model_module_version: MODULE_VERSION,
      _view_module_version: MODULE_VERSION,
      payload: {},
      step: 0,
      selected: '',
      overlay: 'family',
      precision_overrides: {},
      last_delta: ''
    };
  }

  static serializers: ISerializers = { ...DOMWidgetModel.serializers };
}

export class GraphView extends DOMWidgetView {
  private studio: StudioView | null = null;

  render(): void {
    this.el.classList.add('gie-studio-widget');
    this.studio = new StudioView({
      editable: true,
      onSelect: id => {
        this.model.set('selected', id);
        this.model.save_changes();
      },
      onStep: k => {
        this.model.set('step', k);
        this.model.save_changes();
      },
      onOverlay: overlay => {
        this.model.set('overlay', overlay);
        this.model.save_changes();
      },
      onPrecision: (layer, precision) => {
        const old = (this.model.get('precision_overrides') ?? {}) as Record<string, string>;
        this.model.set('precision_overrides', { ...old, [layer]: precision });
        this.model.save_changes();
      }
    });
    this.el.replaceChildren(this.studio.node);
    this.payloadChanged();
    this.listenTo(this.model, 'change:payload', this.payloadChanged);
    this.listenTo(this.model, 'change:step', this.stepChanged);
    this.listenTo(this.model, 'change:selected', this.selectedChanged);
    this.listenTo(this.model, 'change:overlay', this.overlayChanged);
    this.listenTo(this.model, 'change:last_delta', this.deltaChanged);
    this.listenTo(this.model, 'change:precision_overrides', this.overridesChanged);
  }

  private payloadChanged(): void {
    const studio = this.studio;
    if (studio === null) {
      return;
    }
    try {
      const payload = parsePayload(this.model.get('payload'));
      this.overlayChanged();
      this.deltaChanged();
      this.overridesChanged();
      studio.setSelected(String(this.model.get('selected') ?? ''));
      studio.setPayload(payload, Number(this.model.get('step') ?? payload.current_step));
      if (!this.el.contains(studio.node)) {
        this.el.replaceChildren(studio.node);
      }
    } catch (error) {
      const message = document.createElement('pre');
      message.className = 'gie-error';
      message.textContent = `GIE Studio cannot show this payload: ${(error as Error).message}`;
      this.el.replaceChildren(message);
    }
  }

  private stepChanged(): void {
    this.studio?.setStep(Number(this.model.get('step')));
  }

  private selectedChanged(): void {
    this.studio?.setSelected(String(this.model.get('selected') ?? ''));
  }

  private overlayChanged(): void {
    const overlay = String(this.model.get('overlay'));
    if ((OVERLAYS as readonly string[]).includes(overlay)) {
      this.studio?.setOverlay(overlay as Overlay);
    }
  }

  private deltaChanged(): void {
    this.studio?.setDelta(String(this.model.get('last_delta') ?? ''));
  }

  private overridesChanged(): void {
    this.studio?.setOverrides((this.model.get('precision_overrides') ?? {}) as Record<string, string>);
  }

  remove(): void {
    this.studio?.dispose();
    this.studio = null;
    super.remove();
  }
}
