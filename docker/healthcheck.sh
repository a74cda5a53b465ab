#!/bin/bash
# Health probes for docker/compose.yaml, with nothing but bash (the images have no curl/sipsak):
#   healthcheck.sh http HOST PORT      GET /healthz answers 200 with "ok" (sipwarden's admin)
#   healthcheck.sh sip HOST PORT       a SIP OPTIONS over UDP answered 200 (the PBX)
# Exit 0 healthy, 1 not.  Each probe gives up after 3 s.
set -u
mode=${1:-} host=${2:-} port=${3:-}
case $mode in
http)
	exec 3<>"/dev/tcp/$host/$port" || exit 1
	printf 'GET /healthz HTTP/1.0\r\nHost: %s\r\n\r\n' "$host" >&3
	reply=$(timeout 3 head -c 512 <&3) || exit 1
	[[ $reply == "HTTP/1."?" 200"* && $reply == *ok* ]]
	;;
sip)
	exec 3<>"/dev/udp/$host/$port" || exit 1
	tag=$RANDOM$RANDOM
	# one datagram: bash's printf writes line by line, so dd collects the message and writes it once
	printf -v msg 'OPTIONS sip:%s:%s SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKhc%s;rport\r\nMax-Forwards: 70\r\nFrom: <sip:health@%s>;tag=%s\r\nTo: <sip:%s:%s>\r\nCall-ID: health-%s\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n' \
		"$host" "$port" "$tag" "$host" "$tag" "$host" "$port" "$tag"
	printf '%s' "$msg" | dd bs=4096 iflag=fullblock status=none >&3 || exit 1
	reply=$(timeout 3 head -c 12 <&3) || exit 1
	[[ $reply == "SIP/2.0 200 " ]]
	;;
*)
	echo "usage: $0 http|sip HOST PORT" >&2
	exit 2
	;;
esac
