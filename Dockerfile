# syntax=docker/dockerfile:1
# The zroute image that deploy/kubernetes runs: `docker build -t zroute:0.1.0 .` from the
# repository's root. The entry point is the zroute command: `docker run zroute:0.1.0
# serve --host 0.0.0.0`, or a subcommand and its options as a pod's args.

# The wheels of zroute and its dependencies, built apart so that no source or build
# tool is left in the image.
FROM python:3.12-slim AS wheels
WORKDIR /src
COPY pyproject.toml README.md ./
COPY broker broker
COPY gateway gateway
COPY worker worker
COPY zroute zroute
COPY zroute_cli zroute_cli
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels zroute
# Not root: the Kubernetes manifests run it as this user (runAsUser), with a read-only
# root file system.
RUN useradd --system --uid 10001 --user-group --no-create-home zroute
USER 10001:10001
ENTRYPOINT ["zroute"]
CMD ["--help"]
