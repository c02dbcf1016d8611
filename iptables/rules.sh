# shellcheck shell=sh
# rules.sh: the rule set, described once for every backend. Pure: it reads
# the validated options and calls the vocabulary below, which a renderer
# defines (restore.sh: iptables-restore input); it never runs iptables.
#
# Chains (all in the nat table, plus one in mangle with --drop-invalid):
#
#   PREROUTING -p tcp -> SIDECAR_INBOUND     connections arriving at the pod
#       exclusions RETURN, the captured ports -> SIDECAR_IN_REDIRECT
#   OUTPUT -p tcp     -> SIDECAR_OUTPUT      connections the pod opens
#       1. the proxy's own connections RETURN (the method's bypass rules)
#       2. loopback RETURNs; the app calling its own pod IP -> SIDECAR_INBOUND
#       3. exclusions RETURN, the captured destinations -> SIDECAR_REDIRECT
#   SIDECAR_REDIRECT, SIDECAR_IN_REDIRECT    REDIRECT to the proxy port
#   raw OUTPUT -p tcp -> SIDECAR_PROXY_ZONE  the proxy's own connections get
#       a conntrack zone of their own (methods with a bypass)
#   mangle PREROUTING -p tcp -> SIDECAR_DROP_INVALID   (--drop-invalid)
#   --inbound-mode tproxy: inbound is not NATed but handed to the proxy by
#   TPROXY, so that the proxy sees (and passes on) the client's address:
#   mangle PREROUTING -p tcp -> SIDECAR_TPROXY_INBOUND (no nat PREROUTING
#       hook): the proxy's own connection to the app and lo RETURN,
#       exclusions RETURN, the captured ports -> SIDECAR_TPROXY (TPROXY to
#       the proxy port, with the tproxy mark); the mark is saved to the
#       connection (CONNMARK)
#   mangle OUTPUT -p tcp -> SIDECAR_TPROXY_OUTPUT: the connection's mark
#       back on its packets (the app's replies to the client's address are
#       routed to lo by the policy routing, apply.sh: tproxy_routes)
#
# Built-in chains get only the jumps (hook), which the renderer puts after
# the rules of our chains. Each part below brings its chains' rules and
# their hook along, so a part that is left out leaves nothing behind.
#
# The vocabulary (the method files use it too):
#   table NAME                        the rules below go into table NAME
#   why TEXT                          the intent of the rules below
#   rule CHAIN WHAT TARGET [TERM...]  one rule in our CHAIN; WHAT is its
#                                     comment; TARGET RETURN, DROP, one of
#                                     our chains, REDIRECT=PORT, or ZONE=N
#                                     (track the connection in conntrack
#                                     zone N, original direction only)
#   rules_per_ports CHAIN PORTS WHAT TARGET
#                                     TCP to any of the comma-separated
#                                     PORTS, in as few rules as the backend
#                                     allows; WHAT singular, the ports added
#   rules_per_destinations CHAIN WHAT TARGET DESTS
#                                     TCP to any of DESTS ("CIDR PORT" a
#                                     line, one family): a rule each for
#                                     iptables, one set and one rule for nft
#   hook BUILTIN CHAIN WHAT WHY       the TCP packets of a built-in chain
#                                     enter our CHAIN
# and the match terms of a rule, all of which must hold, in the order
# iptables-save prints them:
#   from=CIDR  to=CIDR  !to=CIDR      source, destination, not destination
#   out=IFACE                         leaves through IFACE
#   tcp  port=PORT  ports=P,Q,...     TCP; to PORT; to any of at most 15
#   uid=UID  gid=GID                  the socket's owner
#   mark=MARK                         the packet's mark
#   classid=ID  cgroup-path=PATH      the socket's net_cls classid, cgroup v2
#   ctstate=STATE                     conntrack's state of the packet
#   in=IFACE                          arrived through IFACE
#   connmark=MARK                     the connection's mark
# and the targets TPROXY=PORT (the tproxy mark, --on-ip of the family),
# CONNMARK=save and CONNMARK=restore (the whole mark).

# Loaded by lib.sh; redirect.sh and lib.sh set the options and other
# globals read here:
# shellcheck disable=SC2154

# family_rules 4|6: the rule set of one address family.
family_rules() {
	if [ "$1" = 4 ]; then
		fam_name=IPv4 fam_lo=127.0.0.1/32 fam_lo_net=127.0.0.0/8
	else
		fam_name=IPv6 fam_lo=::1/128 fam_lo_net=::1/128
	fi
	table nat
	why "A captured outbound connection goes to the proxy, which reads where it was going with SO_ORIGINAL_DST."
	rule SIDECAR_REDIRECT "outbound to proxy port $opt_proxy_port" "REDIRECT=$opt_proxy_port" tcp
	[ "$inbound" = none ] || inbound_rules
	output_rules "$1"
	! method_bypasses_proxy || proxy_zone_rules
	if [ "$drop_invalid" = true ] || tproxy_on; then
		table mangle
		[ "$drop_invalid" = false ] || drop_invalid_rules
		! tproxy_on || tproxy_rules
	fi
}

# tproxy_on: is inbound captured by TPROXY (--inbound-mode tproxy, and
# inbound capture on)?
tproxy_on() {
	[ "$opt_inbound_mode" = tproxy ] && [ "$inbound" != none ]
}

# inbound_rules: connections arriving at the pod (all of it is left out
# with --inbound-ports "").
inbound_rules() {
	why "A captured inbound connection goes to the same port; the proxy tells inbound from outbound by the original destination (one of the pod's own addresses)."
	rule SIDECAR_IN_REDIRECT "inbound to proxy port $opt_proxy_port" "REDIRECT=$opt_proxy_port" tcp
	inbound_capture_rules SIDECAR_INBOUND SIDECAR_IN_REDIRECT
	# with tproxy, connections from outside take the mangle path
	# (tproxy_rules); the chain above still serves the app calling its own
	# pod IP, which never passes PREROUTING
	tproxy_on || hook PREROUTING SIDECAR_INBOUND "inbound capture" "inbound TCP connections enter our inbound chain."
}

# inbound_capture_rules CHAIN TARGET: which inbound connections CHAIN sends
# to TARGET (the nat REDIRECT, or TPROXY): not those to the proxy port
# itself, nor the excluded ports; every other port, or the listed ones.
inbound_capture_rules() {
	why "A connection made to the proxy port itself reaches the proxy as it is: redirecting it would give the proxy its own port as the original destination, a loop."
	rule "$1" "inbound to the proxy port itself" RETURN "port=$opt_proxy_port"
	if [ -n "$opt_exclude_inbound_ports" ]; then
		why "Excluded inbound ports (--exclude-inbound-ports) go straight to the app."
		rules_per_ports "$1" "$opt_exclude_inbound_ports" "excluded inbound port" RETURN
	fi
	if [ "$inbound" = all ]; then
		why "Every other inbound TCP connection goes through the proxy (the design note: assume all inbound traffic does)."
		rule "$1" "inbound, every port" "$2"
	else
		why "Inbound connections to the listed ports (--inbound-ports) go through the proxy; other ports go straight to the app."
		rules_per_ports "$1" "$opt_inbound_ports" "captured inbound port" "$2"
	fi
}

# output_rules 4|6: connections the pod opens.
output_rules() {
	if tproxy_on; then
		why "The proxy's connection to the app for a TPROXY'd client carries the tproxy mark (and the client's address): it goes to the app as it is, whatever the bypass method."
		rule SIDECAR_OUTPUT "proxy to the app, tproxy mark $(printf '0x%x' "$tproxy_mark")" RETURN out=lo "mark=$tproxy_mark"
	fi
	if [ "$opt_inbound_source" != pod-ip ]; then
		if [ "$1" = 4 ]; then _or_src=127.0.0.6/32; else _or_src=::6/128; fi
		why "The proxy connects to the app from ${_or_src%/*} (--inbound-source, Istio's InboundPassthroughBindIpv4/Ipv6): such a connection is the proxy's, never captured again, whatever the bypass method."
		rule SIDECAR_OUTPUT "proxy to the app, from ${_or_src%/*}" RETURN "from=$_or_src" out=lo
	fi
	method_output_bypass "$1"

	why "Connections from the loopback address ($fam_lo) are never captured: the design note's ! -s 127.0.0.1/32."
	rule SIDECAR_OUTPUT "from loopback" RETURN "from=$fam_lo"
	why "Nor are connections to it: proxy-aware apps talk to the proxy's loopback listeners there."
	rule SIDECAR_OUTPUT "to loopback" RETURN "to=$fam_lo"
	if [ "$1" = 6 ]; then
		why "Nor are connections to fe80::/10 (IPv6 link-local): such an address names a host only together with its interface (the scope id), and the original destination the proxy reads back carries none, so the proxy could not reach it. They go out directly."
		rule SIDECAR_OUTPUT "to link-local" RETURN "to=fe80::/10"
	fi
	if [ "$inbound" != none ] && method_bypasses_proxy; then
		why "The app calling its own pod IP (it leaves through lo, to a non-loopback address) goes through the proxy like any inbound connection. The proxy's own connection to the pod IP cannot loop: the bypass above returned it already."
		rule SIDECAR_OUTPUT "to own pod IP, as inbound" SIDECAR_INBOUND "!to=$fam_lo_net" out=lo
	fi
	why "Anything else that stays inside the pod (out through lo) is not captured."
	rule SIDECAR_OUTPUT "stays on lo" RETURN out=lo

	if [ -n "$opt_exclude_outbound_ports" ]; then
		why "Excluded outbound ports (--exclude-outbound-ports) go out directly."
		rules_per_ports SIDECAR_OUTPUT "$opt_exclude_outbound_ports" "excluded outbound port" RETURN
	fi
	family_words "$1" "$exclude4" "$exclude6"
	if [ -n "$REPLY" ]; then
		why "Excluded destinations (--exclude-cidrs) are reached directly."
		for_each_word "$REPLY" _excluded_cidr_rule
	fi

	method_output_capture "$1"
	hook OUTPUT SIDECAR_OUTPUT "outbound capture" "outbound TCP connections enter our outbound chain."
}
_excluded_cidr_rule() {
	rule SIDECAR_OUTPUT "excluded destination $1" RETURN "to=$1"
}

# capture_all_rules 4|6: the capture step of the methods that tell the
# proxy's traffic apart (uid, mark, cgroup): every remaining outbound
# connection, or only those to --include-cidrs.
capture_all_rules() {
	case "$include" in
	none)
		why "Outbound capture is off (--include-cidrs \"\"): no outbound connection is captured."
		;;
	all)
		why "Every other outbound TCP connection goes through the proxy."
		rule SIDECAR_OUTPUT "outbound, every destination" SIDECAR_REDIRECT
		;;
	list)
		family_words "$1" "$include4" "$include6"
		if [ -z "$REPLY" ]; then
			why "--include-cidrs names no $fam_name network: no outbound $fam_name connection is captured."
		else
			why "Only connections to the included networks (--include-cidrs) go through the proxy."
			for_each_word "$REPLY" _included_cidr_rule
		fi
		;;
	esac
}
_included_cidr_rule() {
	rule SIDECAR_OUTPUT "included destination $1" SIDECAR_REDIRECT "to=$1"
}

# proxy_zone_rules: the proxy's own connections are tracked apart from the
# app's. Without this, a connection the proxy gave up on (a black-holed
# destination: its conntrack entry stays in SYN_SENT for two minutes) could
# be matched by a later app connection that happens to get the same source
# port: conntrack takes the app's SYN for a retransmission of the proxy's,
# the nat table never sees it, and it escapes capture. iptables/README.md,
# "Conntrack and the proxy's own connections", has the figures.
proxy_zone_rules() {
	table raw
	why "The proxy's own connections are tracked in conntrack zone $PROXY_ZONE in their original direction (the replies stay in the default zone, where they find them). An app connection that reuses the addresses and ports of one the proxy gave up on then gets an entry of its own and is captured, instead of passing as a retransmission of the proxy's."
	method_own_traffic _proxy_zone_rule
	hook OUTPUT SIDECAR_PROXY_ZONE "proxy zone" "outbound TCP packets pass the proxy-zone rules before conntrack sees them."
}
_proxy_zone_rule() {
	rule SIDECAR_PROXY_ZONE "proxy own traffic, $1: conntrack zone $PROXY_ZONE" "ZONE=$PROXY_ZONE" "$2"
}

# The conntrack zone of the proxy's own connections (original direction).
PROXY_ZONE=1

drop_invalid_rules() {
	why "A TCP packet conntrack cannot place in any connection (state INVALID, e.g. out of window) is never NATed: it would reach the app with its original address, and the app's reset would kill the proxied connection. Drop it instead (what Istio does with INVALID_DROP)."
	rule SIDECAR_DROP_INVALID "conntrack INVALID" DROP tcp ctstate=INVALID
	hook PREROUTING SIDECAR_DROP_INVALID "drop invalid" "every inbound TCP packet passes the INVALID check first."
}

# tproxy_rules: inbound connections from outside are handed to the proxy's
# transparent listener by TPROXY, unNATed: the proxy reads the original
# destination with getsockname and connects to the app from the client's
# address (Istio's TPROXY interception mode). The tproxy mark routes them
# to the local stack (apply.sh: ip rule fwmark MARK lookup TABLE, ip route
# local default dev lo table TABLE).
tproxy_rules() {
	_tr_mark=$(printf '0x%x' "$tproxy_mark")
	why "The proxy's own connection to the app (over lo, with the tproxy mark it set): the connection keeps the mark (CONNMARK), so that the app's replies, addressed to the client, are routed back to the proxy."
	rule SIDECAR_TPROXY_INBOUND "proxy to the app, save mark $_tr_mark" CONNMARK=save tcp "mark=$tproxy_mark"
	why "Nor is that connection captured again."
	rule SIDECAR_TPROXY_INBOUND "proxy to the app, tproxy mark $_tr_mark" RETURN tcp "mark=$tproxy_mark"
	why "Whatever arrives through lo was sent inside the pod: the nat OUTPUT rules decided about it already."
	rule SIDECAR_TPROXY_INBOUND "stays on lo" RETURN in=lo
	why "A packet of a connection conntrack knows already was decided at its first one: a reply to a connection the pod opened (TPROXY would drop it: its socket is not transparent), or the rest of a TPROXY'd one (delivered to the proxy's socket by its address)."
	rule SIDECAR_TPROXY_INBOUND "established connection" RETURN tcp ctstate=RELATED,ESTABLISHED
	inbound_capture_rules SIDECAR_TPROXY_INBOUND SIDECAR_TPROXY
	why "A captured inbound connection goes to the proxy's transparent listener, its destination untouched (the proxy reads it with getsockname); the mark routes it to the local stack."
	rule SIDECAR_TPROXY "inbound to proxy port $opt_proxy_port, tproxy" "TPROXY=$opt_proxy_port" tcp
	hook PREROUTING SIDECAR_TPROXY_INBOUND "inbound capture, tproxy" "inbound TCP packets enter our TPROXY chain."
	why "Packets of a connection that carries the tproxy mark get it back (the app's replies to the proxy's connection), so that the policy routing sends them to lo, to the proxy, and not out to the client."
	rule SIDECAR_TPROXY_OUTPUT "restore tproxy mark $_tr_mark" CONNMARK=restore tcp "connmark=$tproxy_mark"
	hook OUTPUT SIDECAR_TPROXY_OUTPUT "tproxy replies" "outbound TCP packets get their connection's tproxy mark back."
}

# family_words 4|6 V4WORDS V6WORDS: the list of the given family, in REPLY.
family_words() {
	if [ "$1" = 4 ]; then REPLY="$2"; else REPLY="$3"; fi
}
