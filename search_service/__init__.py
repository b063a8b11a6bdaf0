"""The coca-search gRPC service (coca.search.v1): text -> image search over a durable store.

store.py (SQLite, the truth) + index.py (FAISS, derived) = engine.py; models.py talks to Triton;
service.py maps RPCs onto them; server.py runs it. See search_service/README.md.
"""
