# syntax=docker/dockerfile:1
# megatron-pref on an NGC PyTorch image: PyTorch, CUDA, cuDNN, NCCL and Transformer Engine
# come with the base image; this adds megatron-core (pinned like setup.py) and this package.
#
#   docker build -t megatron-pref .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 --rm -it \
#       -v /data:/data megatron-pref \
#       torchrun --nproc-per-node 8 pretrain_pref.py --loss spo ...
#
# megatron-core 0.16.1 is tested against Transformer Engine >= 2.9, < 2.12 (its "dev" extra):
# pick an NGC release whose TE is in that range (checked below, the build fails otherwise).
# tests/test_packaging.py checks that this file and setup.py agree.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

# Must equal setup.py's install_requires pin (tests/test_packaging.py checks it).
ARG MEGATRON_CORE_VERSION=0.16.1

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace/megatron-pref

# NGC pins every preinstalled package in /etc/pip/constraint.txt. Keep the pins of the
# CUDA-bound stack (torch, TE, apex, flash-attn, NVIDIA libraries, numpy) so nothing here can
# replace them, and drop the others so the pure-Python dependencies can resolve.
RUN grep -iE '^(torch|torchvision|torchaudio|triton|transformer[-_]engine|apex|flash[-_]attn|nvidia[-_]|cuda[-_]|cupy|numpy)\b' \
        /etc/pip/constraint.txt > /etc/pip/constraint-gpu.txt || true \
    && python -c "import torch; print(torch.__version__)" > /etc/pip/torch-version.txt \
    && cat /etc/pip/constraint-gpu.txt
ENV PIP_CONSTRAINT=/etc/pip/constraint-gpu.txt

# Dependencies first, in their own layer (rebuilt only when setup.py changes).
COPY setup.py ./
COPY megatron_pref/__init__.py megatron_pref/__init__.py
RUN pip install "megatron-core==${MEGATRON_CORE_VERSION}" -e ".[logging,test]"

# This package, from this checkout (editable: tests, tools and pretrain_pref.py run from here).
COPY . .
RUN pip install --no-deps -e . \
    && python -c "from importlib.metadata import version as v; mc = v('megatron-core'); assert mc == '${MEGATRON_CORE_VERSION}', mc; print('megatron-core', mc, '| megatron-pref', v('megatron-pref'))" \
    && test "$(python -c 'import torch; print(torch.__version__)')" = "$(cat /etc/pip/torch-version.txt)" \
    && python -c "from importlib.metadata import version as v; from packaging.version import Version as V; te = V(v('transformer_engine')); assert V('2.9.0a0') <= te < V('2.12'), f'Transformer Engine {te} is outside megatron-core 0.16.1 range [2.9, 2.12): choose another BASE_IMAGE'; print('transformer_engine', te)"

# No ENTRYPOINT: the NGC entrypoint stays, and `docker run ... <command>` runs the command.
