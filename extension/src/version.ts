/** npm module name and version of the widget module (studio/widgets.py expects "^0.1.0"). */
export const MODULE_NAME = 'gie-studio';
export const MODULE_VERSION = '0.1.0';
