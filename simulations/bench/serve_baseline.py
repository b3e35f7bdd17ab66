"""The serving baseline: a minimal FastAPI endpoint calling the same model, unbatched.

Written the way a FastAPI tutorial would: a pydantic body, a plain ``def`` endpoint
(FastAPI runs it in its thread pool), one forward pass per request, a dict back.

    ARTIFACT=runs/x/model uvicorn serve_baseline:app    (the bench starts it)
"""

from __future__ import annotations

import os

import torch
from fastapi import FastAPI
from pydantic import BaseModel

from fedfuse.artifact.predictor import FusedPredictor

torch.set_num_threads(1)
predictor = FusedPredictor.load(os.environ["ARTIFACT"])
app = FastAPI()


class Request(BaseModel):
    instances: list


@app.post("/predict")
def predict(request: Request) -> dict:
    proba = predictor.predict_proba(request.instances)
    labels = [predictor.schema.class_labels[i] for i in proba.argmax(axis=1)]
    return {"labels": labels, "probabilities": proba.tolist()}


@app.get("/readyz")
def readyz() -> dict:
    return {"status": "ready"}
