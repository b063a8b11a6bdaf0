"""Bulk ingest on Ray Data: `coca index SOURCE --ray [ADDRESS]`.

Ray reads and checks images and hashes them in parallel, skips content the service already holds,
embeds the rest through one or more Triton endpoints (an actor per endpoint) or lets the service embed
them, and writes through the service's AddImages streams. See pipeline.py; sources.py says what SOURCE
can be; cli.py is the command. Ray is imported only when a run starts.
"""
