# CPU image of the pipeline. Build: docker build -t scriptorium .   Run: docker run --rm -v $PWD/artifacts:/app/artifacts scriptorium
# (No Docker engine runs on the development machines; this file is not exercised by the tests.)
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
ENV PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the CPU wheel index: a bare requirement would pull several GB of CUDA packages.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# llama-cpp-python from source with patches/*.patch applied (patches/README.md), before the project pins it.
COPY patches patches
RUN python patches/install_llama_cpp.py
COPY pyproject.toml README.md ./
COPY flows flows
COPY tasks tasks
COPY pipeline_config pipeline_config
COPY model model
COPY data data
RUN pip install -e .

CMD ["python", "-m", "flows", "--preset", "quickstart"]
