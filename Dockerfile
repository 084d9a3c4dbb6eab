# ws-exporter: one Python file on a distroless Python image, running as the nonroot user.
FROM gcr.io/distroless/python3-debian13:nonroot
COPY ws_exporter.py /app/ws_exporter.py
# Compiled once, at build time: compiling this file at every start leaves ~1.5 MB of the
# compiler's garbage in the process.  The hash check keeps a ws_exporter.py mounted over this one
# from running as the stale bytecode.  The build needs root to write /app/__pycache__; the
# exporter does not.
USER 0
RUN ["/usr/bin/python3", "-c", "import py_compile as c; c.compile('/app/ws_exporter.py', doraise=True, invalidation_mode=c.PycInvalidationMode.CHECKED_HASH)"]
USER 65532:65532
# Run as a module (-m), not as a script: CPython keeps a script's syntax tree in memory until the
# script returns; a module's is freed once compiled, and a module can use the compiled file.
# -S: the exporter needs nothing from site-packages, and skipping site keeps any .pth hook out of
# the process.
# GLIBC_TUNABLES: no cache of freed blocks for each thread in glibc's malloc.  A handler thread
# lives as long as its scraper's connection, and its cache filled for hours with blocks it never
# gave back: memory grew ~0.1 MB a minute under a steady scrape, and with the cache off stays
# flat, for no measurable CPU (docs/internals.md, "Memory").
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/app GLIBC_TUNABLES=glibc.malloc.tcache_count=0
EXPOSE 9095
ENTRYPOINT ["/usr/bin/python3", "-S", "-m", "ws_exporter"]
CMD ["--web.listen-address=:9095"]
