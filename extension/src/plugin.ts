/** The JupyterLab plugin that registers the "gie-studio" widget module with ipywidgets. */

import type { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { IJupyterWidgetRegistry } from '@jupyter-widgets/base';

import { GraphModel, GraphView } from './widget';
import { MODULE_NAME, MODULE_VERSION } from './version';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'gie-studio:widget',
  description: 'The GIE Studio GraphView widget (ipywidgets module "gie-studio").',
  requires: [IJupyterWidgetRegistry],
  autoStart: true,
  activate: (_app: JupyterFrontEnd, registry: IJupyterWidgetRegistry): void => {
    // an explicit exports object: the widget manager looks names up on it
    registry.registerWidget({ name: MODULE_NAME, version: MODULE_VERSION, exports: { GraphModel, GraphView } });
  }
};

export default plugin;
