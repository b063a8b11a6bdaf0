"""The coca-search gRPC service (coca.search.v1): text -> image search over a durable store.

store.py (SQLite, the truth) + index.py (FAISS, derived) = engine.py; models.py talks to Triton;
service.py maps RPCs onto them; server.py runs it. See search_service/README.md.

What applications use (`coca serve`, the demo) is named here; the modules behind it are the
service's own. Loaded on first use: the client library imports `search_service.pb`, which must
not pull in the service.
"""

_PUBLIC = {  # name -> module that defines it
    "ServiceConfig": "config", "DEFAULT_PORT": "config", "IndexSettings": "index",
    "run": "server", "add_store_arguments": "server", "store_settings": "server", "ServiceChild": "process",
    "add_operator_arguments": "server", "operator_settings": "server", "add_backup_argument": "server",
    "backup_data_dir": "backup", "verify_backup": "backup", "restore_backup": "backup",
    "restore_collection": "milvus_backup", "backup_named_collection": "milvus_backup", "MilvusSettings": "milvus", "milvus_token": "server",
}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'search_service' has no attribute {name!r}")
