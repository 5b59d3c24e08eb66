"""The HTTP floor for ``bench/api.py``: the same stack as ``embedq serve`` (uvicorn, FastAPI,
the request model, an answer of one 384-float vector in OpenAI's shape, one trip through the
thread pool) around a handler that only waits ``--wait-ms`` in that thread, as the real one
waits for the workers. What a client sees beyond the wait is what any such HTTP server costs
on this machine, the wake-ups after the wait included.

    python bench/http_floor.py --port P --wait-ms W
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.api.embeddings import EmbeddingRequest

# A unit vector of 384 float32 values as embedq answers them (float32 -> Python floats).
VECTOR = (lambda v: (v / np.linalg.norm(v)).tolist())(
    np.random.default_rng(0).standard_normal(384).astype(np.float32)
)


def create_app(wait_ms: float) -> FastAPI:
    app = FastAPI()
    answer = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": VECTOR}],
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }

    @app.post("/v1/embeddings")
    def embeddings(body: EmbeddingRequest) -> Response:
        started = time.perf_counter()
        time.sleep(wait_ms / 1000)
        content = json.dumps({**answer, "model": body.model})
        spent = (time.perf_counter() - started) * 1000
        timing = f"wait;dur={spent:.3f}"
        return Response(content, media_type="application/json", headers={"server-timing": timing})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--wait-ms", type=float, required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.wait_ms), host="127.0.0.1", port=args.port, log_config=None)


if __name__ == "__main__":
    main()
