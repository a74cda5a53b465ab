# The demo PBX of docker/compose.yaml: Kamailio from Debian's packages.  Its configuration
# (docker/kamailio-pbx.cfg) is mounted by the compose file.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends kamailio \
    && rm -rf /var/lib/apt/lists/*
CMD ["kamailio", "-f", "/etc/kamailio/kamailio-pbx.cfg", "-DD", "-E", "-Y", "/tmp", "-P", "/tmp/kamailio.pid"]
