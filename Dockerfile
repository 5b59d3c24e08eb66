# syntax=docker/dockerfile:1
# Worker, producer and Flower images for embedq. Two runtime targets:
#   cpu: onnxruntime and OpenVINO on the CPU (bf16 models on CPUs with AVX512-BF16 or AMX; also
#        used for migrations and Flower)
#   gpu: onnxruntime-gpu with the CUDA and cuDNN libraries from PyPI (needs the NVIDIA runtime)
# No torch and no transformers: workers run prepared ONNX models; export happens elsewhere
# (`pip install 'embedq[export]'`) or from hub repositories that ship ONNX files.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY worker ./worker
COPY tasks ./tasks
COPY storage ./storage
COPY migrations ./migrations
# The worker extra: `pip install .` alone is the client side (no onnxruntime, no tokenizers);
# serve for the fleet's API service (FastAPI, uvicorn).
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install '.[worker,serve]' \
    && /opt/venv/bin/pip uninstall -y onnxruntime-gpu \
    && /opt/venv/bin/pip install "onnxruntime>=1.20"

FROM build AS build-cpu
# The openvino extra's requirement, installed alone: `.[openvino]` would bring onnxruntime-gpu back.
RUN /opt/venv/bin/pip install "openvino>=2025.1"

FROM python:3.11-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    EMBEDQ_MODEL_DIR=/models
RUN useradd --create-home --uid 10001 embedq \
    && mkdir -p /models /files \
    && chown embedq /models /files
WORKDIR /home/embedq

FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
USER embedq
CMD ["embedq", "worker"]

# The GPU stages come last: Docker's classic builder (docker-compose 1.29's) builds every stage
# before the target, so placed earlier they cost a `cpu` build 2 GB of CUDA libraries.
FROM build AS build-gpu
RUN /opt/venv/bin/pip uninstall -y onnxruntime \
    && /opt/venv/bin/pip install "onnxruntime-gpu[cuda,cudnn]>=1.20"

FROM runtime AS gpu
COPY --from=build-gpu /opt/venv /opt/venv
USER embedq
CMD ["embedq", "worker"]
