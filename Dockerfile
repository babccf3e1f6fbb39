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

WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY detector ./detector
# A normal (non-editable) install: the wheel carries the JSON Schemas as detector/schema_files/ (mapped
# from schemas/ in pyproject.toml), so the source is not needed at run time and is removed. The last
# command proves that the installed package finds and compiles its schemas without it.
RUN pip install . \
 && cd / && rm -rf /src \
 && detector --help >/dev/null \
 && python -c "from detector.schemas import EVENT_SCHEMA, validator; validator(EVENT_SCHEMA)"

USER 10001:10001
# Faust's local state; a named volume or a PVC is mounted here (a fresh named volume copies the ownership).
ENV DETECTOR_WORKER__DATA_DIR=/data
WORKDIR /home/detector

# 9464: Prometheus /metrics of `detector worker`; 6066: the worker's web server (/detector/stats/).
EXPOSE 9464 6066
ENTRYPOINT ["detector"]
CMD ["--help"]
