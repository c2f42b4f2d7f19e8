"""GIE Studio notebook surface (Session, display, widgets); filled in by the Studio issue."""
