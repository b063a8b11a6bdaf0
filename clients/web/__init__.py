"""Web gallery of the search service (see server.py)."""
