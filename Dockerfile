# One image for every clawhub service; compose.yaml picks the service with the command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gen gen
COPY services services
RUN pip install --no-cache-dir .
ENV CLAWHUB_DATA_DIR=/data
EXPOSE 50051
CMD ["python", "-m", "services.gateway"]
