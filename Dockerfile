# ws-exporter: one Python file on a distroless Python image, running as the nonroot user.
FROM gcr.io/distroless/python3-debian13:nonroot
COPY ws_exporter.py /app/ws_exporter.py
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
EXPOSE 9095
ENTRYPOINT ["/usr/bin/python3", "/app/ws_exporter.py"]
CMD ["--web.listen-address=:9095"]
