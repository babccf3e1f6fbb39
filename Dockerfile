# The detector's one image: `detector worker`, `detector ratelimit`, `detector simulate`, ... (entrypoint
# `detector`, the command is the argument). Configuration comes from DETECTOR_* variables only.
#
#   docker build -t distill-detector .
#   docker run --rm -e DETECTOR_KAFKA__BOOTSTRAP=kafka:9092 distill-detector worker
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed uid/gid, so volumes and Kubernetes' runAsUser/fsGroup can name it.
RUN groupadd --system --gid 10001 detector \
 && useradd --system --uid 10001 --gid detector --home-dir /home/detector --create-home detector \
 && mkdir -p /data \
 && chown detector:detector /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY detector ./detector
# Editable on purpose: detector/schemas.py loads the JSON Schemas from <repo>/schemas, next to the package,
# and a wheel does not carry that directory (package-data names detector/schemas/*.json, which does not
# exist). With the source at /app, `detector` finds /app/schemas. Switch to `pip install .` once the
# schemas ship inside the package.
RUN pip install -e . \
 && detector --help >/dev/null

USER 10001:10001
# Faust's local state; a named volume or a PVC is mounted here (a fresh named volume copies the ownership).
ENV DETECTOR_WORKER__DATA_DIR=/data
WORKDIR /home/detector

# 9464: Prometheus /metrics of `detector worker`; 6066: the worker's web server (/detector/stats/).
EXPOSE 9464 6066
ENTRYPOINT ["detector"]
CMD ["--help"]
