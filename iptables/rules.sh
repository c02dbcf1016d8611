# shellcheck shell=sh
# rules.sh: the rule set, rendered as iptables-restore input. Pure: it reads
# the validated options and prints text; it never runs iptables.
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
#   mangle PREROUTING -p tcp -> SIDECAR_DROP_INVALID   (--drop-invalid)
#
# Built-in chains get only the jumps. The jumps come last in each table so
# the text reads "build the chains, then hook them in"; the whole table is
# one iptables-restore commit either way.

# Sourced by redirect.sh and cleanup.sh, which (with lib.sh) set the
# options and other globals read here:
# shellcheck disable=SC2154

# render_family 4|6: the complete restore input for one address family.
render_family() {
	if [ "$1" = 4 ]; then
		fam_name=IPv4 fam_lo=127.0.0.1/32 fam_lo_net=127.0.0.0/8 fam_restore=iptables-restore
	else
		fam_name=IPv6 fam_lo=::1/128 fam_lo_net=::1/128 fam_restore=ip6tables-restore
	fi
	printf '# ==== sidecar-proxy %s rules (method %s): input for %s --noflush ====\n' \
		"$fam_name" "$opt_method" "$fam_restore"
	printf '*nat\n'
	printf ':%s - [0:0]\n' SIDECAR_OUTPUT SIDECAR_REDIRECT
	[ "$inbound" = none ] || printf ':%s - [0:0]\n' SIDECAR_INBOUND SIDECAR_IN_REDIRECT
	render_redirect_chains
	[ "$inbound" = none ] || render_inbound
	render_output "$1"
	render_jumps
	printf 'COMMIT\n'
	[ "$drop_invalid" = false ] || render_drop_invalid
}

render_redirect_chains() {
	why "A captured outbound connection goes to the proxy, which reads where it was going with SO_ORIGINAL_DST."
	rule SIDECAR_REDIRECT "-p tcp" "outbound to proxy port $opt_proxy_port" "REDIRECT --to-ports $opt_proxy_port"
	[ "$inbound" = none ] && return 0
	why "A captured inbound connection goes to the same port; the proxy tells inbound from outbound by the original destination (one of the pod's own addresses)."
	rule SIDECAR_IN_REDIRECT "-p tcp" "inbound to proxy port $opt_proxy_port" "REDIRECT --to-ports $opt_proxy_port"
}

render_inbound() {
	why "A connection made to the proxy port itself reaches the proxy as it is: redirecting it would give the proxy its own port as the original destination, a loop."
	rule SIDECAR_INBOUND "-p tcp -m tcp --dport $opt_proxy_port" "inbound to the proxy port itself" RETURN
	if [ -n "$opt_exclude_inbound_ports" ]; then
		why "Excluded inbound ports (--exclude-inbound-ports) go straight to the app."
		rules_per_ports SIDECAR_INBOUND "$opt_exclude_inbound_ports" "excluded inbound port" RETURN
	fi
	if [ "$inbound" = all ]; then
		why "Every other inbound TCP connection goes through the proxy (the design note: assume all inbound traffic does)."
		rule SIDECAR_INBOUND "" "inbound, every port" SIDECAR_IN_REDIRECT
	else
		why "Inbound connections to the listed ports (--inbound-ports) go through the proxy; other ports go straight to the app."
		rules_per_ports SIDECAR_INBOUND "$opt_inbound_ports" "captured inbound port" SIDECAR_IN_REDIRECT
	fi
}

# render_output 4|6
render_output() {
	method_output_bypass "$1"

	why "Connections from the loopback address ($fam_lo) are never captured: the design note's ! -s 127.0.0.1/32."
	rule SIDECAR_OUTPUT "-s $fam_lo" "from loopback" RETURN
	why "Nor are connections to it: proxy-aware apps talk to the proxy's loopback listeners there."
	rule SIDECAR_OUTPUT "-d $fam_lo" "to loopback" RETURN
	if [ "$inbound" != none ] && method_bypasses_proxy; then
		why "The app calling its own pod IP (it leaves through lo, to a non-loopback address) goes through the proxy like any inbound connection. The proxy's own connection to the pod IP cannot loop: the bypass above returned it already."
		rule SIDECAR_OUTPUT "! -d $fam_lo_net -o lo" "to own pod IP, as inbound" SIDECAR_INBOUND
	fi
	why "Anything else that stays inside the pod (out through lo) is not captured."
	rule SIDECAR_OUTPUT "-o lo" "stays on lo" RETURN

	if [ -n "$opt_exclude_outbound_ports" ]; then
		why "Excluded outbound ports (--exclude-outbound-ports) go out directly."
		rules_per_ports SIDECAR_OUTPUT "$opt_exclude_outbound_ports" "excluded outbound port" RETURN
	fi
	family_words "$1" "$exclude4" "$exclude6"
	if [ -n "$REPLY" ]; then
		why "Excluded destinations (--exclude-cidrs) are reached directly."
		for_each_word "$REPLY" _render_excluded_cidr
	fi

	method_output_capture "$1"
}
_render_excluded_cidr() {
	rule SIDECAR_OUTPUT "$(dest_match "$1")" "excluded destination $1" RETURN
}

# render_capture_all 4|6: the capture step of the methods that tell the
# proxy's traffic apart (uid, mark, cgroup): every remaining outbound
# connection, or only those to --include-cidrs.
render_capture_all() {
	case "$include" in
	none)
		why "Outbound capture is off (--include-cidrs \"\"): no outbound connection is captured."
		;;
	all)
		why "Every other outbound TCP connection goes through the proxy."
		rule SIDECAR_OUTPUT "" "outbound, every destination" SIDECAR_REDIRECT
		;;
	list)
		family_words "$1" "$include4" "$include6"
		if [ -z "$REPLY" ]; then
			why "--include-cidrs names no $fam_name network: no outbound $fam_name connection is captured."
		else
			why "Only connections to the included networks (--include-cidrs) go through the proxy."
			for_each_word "$REPLY" _render_included_cidr
		fi
		;;
	esac
}
_render_included_cidr() {
	rule SIDECAR_OUTPUT "$(dest_match "$1")" "included destination $1" SIDECAR_REDIRECT
}

render_jumps() {
	if [ "$inbound" != none ]; then
		why "Hook: inbound TCP connections enter our inbound chain."
		rule PREROUTING "-p tcp" "inbound capture" SIDECAR_INBOUND
	fi
	why "Hook: outbound TCP connections enter our outbound chain."
	rule OUTPUT "-p tcp" "outbound capture" SIDECAR_OUTPUT
}

render_drop_invalid() {
	printf '*mangle\n'
	printf ':%s - [0:0]\n' SIDECAR_DROP_INVALID
	why "A TCP packet conntrack cannot place in any connection (state INVALID, e.g. out of window) is never NATed: it would reach the app with its original address, and the app's reset would kill the proxied connection. Drop it instead (what Istio does with INVALID_DROP)."
	rule SIDECAR_DROP_INVALID "-p tcp -m conntrack --ctstate INVALID" "conntrack INVALID" DROP
	why "Hook: every inbound TCP packet passes the INVALID check first."
	rule PREROUTING "-p tcp" "drop invalid" SIDECAR_DROP_INVALID
	printf 'COMMIT\n'
}

# family_words 4|6 V4WORDS V6WORDS: the list of the given family, in REPLY.
family_words() {
	if [ "$1" = 4 ]; then REPLY="$2"; else REPLY="$3"; fi
}

# dest_match CIDR: "-d CIDR", or nothing for a /0 (iptables-save omits a
# match on every address, so we do too).
dest_match() {
	case "$1" in
	*/0) ;;
	*) printf -- '-d %s' "$1" ;;
	esac
}
