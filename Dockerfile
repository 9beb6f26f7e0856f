# medvae-retrieval: API image (CPU torch by default; the `gpu` build arg pulls CUDA wheels).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 RETRIEVAL_DATA_DIR=/data HF_HOME=/hf-cache
WORKDIR /app
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md alembic.ini ./
COPY retrieval retrieval
COPY api api
COPY migrations migrations
RUN pip install --extra-index-url ${TORCH_INDEX} "torch<=2.14.1" "torchvision<=0.29.1" && pip install .
EXPOSE 8000
CMD ["retrieval", "serve", "--host", "0.0.0.0", "--port", "8000"]
