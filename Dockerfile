# The pullwake image: every process of compose.yaml is `pullwake <subcommand>`. It installs the
# server extra (the API, the worker, migrations); the runner needs only the base install.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /tmp/pullwake
# The dependencies first, in a layer that changes only with pyproject.toml: an empty package
# of the same name pulls them in, then leaves.
COPY pyproject.toml README.md LICENSE ./
RUN mkdir -p src/pullwake && touch src/pullwake/__init__.py \
    && pip install ".[server]" \
    && pip uninstall -y pullwake
# Then the source, without resolving anything again.
COPY src ./src
RUN pip install --no-deps . \
    && cd / && rm -rf /tmp/pullwake \
    && useradd --create-home --uid 10001 pullwake

USER pullwake
WORKDIR /home/pullwake
EXPOSE 8000
# The API's liveness; compose gives the worker (arq --check) and the runner their own.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=6 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
ENTRYPOINT ["pullwake"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
