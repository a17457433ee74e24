# The pullwake image: every process of compose.yaml is `pullwake <subcommand>`. It installs the
# server extra (the API, the worker, migrations); the runner needs only the base install.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY . /tmp/pullwake
RUN pip install "/tmp/pullwake[server]" \
    && rm -rf /tmp/pullwake \
    && useradd --create-home --uid 10001 pullwake

USER pullwake
WORKDIR /home/pullwake
EXPOSE 8000
ENTRYPOINT ["pullwake"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
