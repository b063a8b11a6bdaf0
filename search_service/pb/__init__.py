"""Generated gRPC code for coca.search.v1 (see search_service/codegen.py)."""
