"""The predict API: ``fedfuse serve`` (FastAPI + uvicorn) over verified artifacts, its
settings (``config``) and its Python client (``client``)."""
