# syntax=docker/dockerfile:1
# authsession: one process serving the public listener (:8080) and the internal
# listener (:8081). Configured only by AUTHSESSION_* and OTEL_* environment variables;
# see RUNBOOK.md. Needs Redis 6.2+.

# --- build: the package as a wheel (Lua scripts included as package data)
FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Every version the image installs is pinned in constraints.txt (`make lock`), the build
# backend included, so a rebuild installs what CI tested rather than whatever is newest.
COPY constraints.txt ./
RUN pip install --constraint constraints.txt pip
# README.md is optional for the build: the bracket pattern lets this copy succeed
# whether or not it exists.
COPY pyproject.toml README.m[d] ./
COPY authsession ./authsession
RUN pip wheel --no-deps --constraint constraints.txt --build-constraint constraints.txt \
    --wheel-dir /wheels .

# --- runtime: the wheel and its dependencies, run as an unprivileged user
FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 authsession \
    && useradd --system --uid 10001 --gid authsession --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin authsession
COPY --from=build /wheels /wheels
COPY constraints.txt /tmp/constraints.txt
RUN pip install --constraint /tmp/constraints.txt pip \
    && pip install --constraint /tmp/constraints.txt "$(echo /wheels/*.whl)[server]" \
    && rm -rf /wheels /tmp/constraints.txt
USER 10001:10001
EXPOSE 8080 8081
# SIGTERM drains both listeners (AUTHSESSION_SHUTDOWN_TIMEOUT) and exits 0; give the
# container a stop grace period longer than that (compose.yaml uses 30s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["authsession"]
