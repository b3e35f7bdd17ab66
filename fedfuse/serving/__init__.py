"""The predict API: ``fedfuse serve`` (FastAPI + uvicorn) over verified artifacts."""
