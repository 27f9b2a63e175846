"""The HTTP face: the app, handlers, /setup/*, zero-copy sending, metrics. Imports flows and below."""
