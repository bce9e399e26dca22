"""The application's own plumbing: errors, user settings, the starter model, the demo, child jobs."""
