# ws-exporter: one Python file on a distroless Python image, running as the nonroot user.
FROM gcr.io/distroless/python3-debian13:nonroot
COPY ws_exporter.py /app/ws_exporter.py
# Run as a module (-m), not as a script: CPython keeps a script's syntax tree in memory until the
# script returns, ~7 MB for this file; a module's is freed once compiled.  -S: the exporter needs
# nothing from site-packages, and skipping site keeps any .pth hook out of every process.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/app
EXPOSE 9095
ENTRYPOINT ["/usr/bin/python3", "-S", "-m", "ws_exporter"]
CMD ["--web.listen-address=:9095"]
