#!/usr/bin/env bash
# DiffusionKit 0.5.2 (the parity reference) on current MLX: its metadata pins mlx==0.17.3, which has no Linux
# wheel, so install it without dependencies and add what its MLX MMDiT's imports need. torch==2.13.0 is the CPU
# wheel these machines keep on disk; an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q --no-deps diffusionkit==0.5.2 argmaxtools
python3 -m pip install -q coremltools transformers huggingface_hub pillow beartype jaxtyping regex sentencepiece safetensors tqdm
