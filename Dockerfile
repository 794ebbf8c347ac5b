# The image for the head and every worker node: the official Ray image plus this project.
#
#   docker build -t lstm-pipeline:0.1.0-cpu .                                   # CPU (gloo)
#   docker build --build-arg RAY_TAG=2.60.0-py311-gpu \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#                -t lstm-pipeline:0.1.0-gpu .                                   # CUDA (NCCL)
#   docker run --rm lstm-pipeline:0.1.0-cpu lstm-pipeline --help
#
# RAY_TAG is <ray version>-py<python>-<variant>. The Ray version must equal the one that submits
# jobs (tests/test_docker.py checks it against the installed ray); variants: `cpu`, `gpu` (the
# image's default CUDA) or a pinned CUDA such as `cu128` (see the tags of rayproject/ray on
# Docker Hub). Pick TORCH_INDEX to match: .../whl/cpu, or the cuXXX wheel index of that CUDA.
ARG RAY_TAG=2.60.0-py311-cpu
FROM rayproject/ray:${RAY_TAG}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# rayproject/ray runs as the non-root user `ray` (uid 1000, group users) with its Python in
# /home/ray/anaconda3, so pip installs need no root. WORKDIR is made explicitly so `ray` owns
# it: pip builds the project in place.
USER ray
RUN mkdir -p /home/ray/lstm-pipeline
WORKDIR /home/ray/lstm-pipeline

# Torch first, from the index that matches the image (PyPI's default wheel bundles CUDA, GBs a
# CPU node does not need); the range is pyproject's, so `pip install .` keeps this build.
RUN pip install --no-cache-dir --index-url ${TORCH_INDEX} "torch>=2.4,<3"

COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users pipeline/ pipeline/
COPY --chown=ray:users jobs/ jobs/
COPY --chown=ray:users conf/ conf/
# The image's Ray already satisfies pyproject's ray range, so pip keeps it (head, workers and
# the submitting client must run the same Ray).
RUN pip install --no-cache-dir . && rm -rf build *.egg-info

# Jobs (`python -m jobs.train ...`, RayJob entrypoints, `lstm-pipeline submit`) run from here,
# where conf/ is; Ray itself is started by KubeRay / `ray up` with `ray start`.
CMD ["lstm-pipeline", "--help"]
