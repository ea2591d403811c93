# natask worker / beat / dashboard image: the app plus natask, nothing else.
FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY natask ./natask
RUN pip install --no-cache-dir ".[metrics,dashboard]"
# Your own tasks module would be copied here too, e.g.: COPY shop ./shop
ENV PYTHONUNBUFFERED=1
USER nobody
CMD ["natask", "worker", "-A", "natask.demo:app"]
