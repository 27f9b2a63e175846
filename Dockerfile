# ocicache in a container: docker build -t ocicache . && docker run -p 5000:5000 -v ocicache:/cache ocicache
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir . && useradd --system --home /cache ocicache && mkdir -p /cache && chown ocicache /cache
USER ocicache
ENV OCICACHE_CACHE_DIR=/cache
VOLUME /cache
EXPOSE 5000
ENTRYPOINT ["ocicache"]
CMD ["serve"]
