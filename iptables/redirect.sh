#!/bin/sh
# redirect.sh: install the sidecar's redirection rules, the privileged
# one-shot init step of a pod. Every TCP connection into and out of the
# network namespace goes to the proxy's port, except the proxy's own
# connections (told apart by the bypass method) and loopback traffic.
#
# Flow: options -> validate everything -> choose the backend -> render the
# rule set (described by rules.sh and method/*.sh; written as
# iptables-restore input per family by restore.sh, or as one nft table by
# nft.sh) -> --dry-run prints it and stops; otherwise -> method set-up ->
# one iptables-restore --noflush per family (apply.sh), everything rolled
# back if any of it fails; or one nft -f transaction (apply_nft.sh).
# --check compares what is installed with the rendered rules (check.sh);
# --reconcile does that, then installs only if they differ.
#
# Exit status: 0 done; 1 applying failed and was rolled back; 2 bad input or
# an unusable environment, found before anything was touched. Errors are one
# line on stderr. See README.md beside this file for the rules and options.
# shellcheck source-path=SCRIPTDIR
set -eu
HERE="${0%/*}"
[ "$HERE" != "$0" ] || HERE=. # started as `sh redirect.sh` in this directory
. "$HERE/lib.sh"

usage() {
	cat <<'EOF'
usage: redirect.sh [--method uid|mark|cgroup|explicit] [options]

Install the rules that redirect every TCP connection of this network
namespace to the sidecar proxy. Options (environment variable, default):

  --method M                  uid, mark, cgroup or explicit (SIDECAR_METHOD, uid)
  --proxy-port PORT           the proxy's port (ISTIO_PROXY_PORT, 5001)
  --proxy-uid UID             uid: the proxy's UID (ISTIO_PROXY_UID, 1337)
  --proxy-gid GID             uid: also bypass this group (SIDECAR_PROXY_GID, none)
  --mark MARK                 mark: the proxy's SO_MARK (ISTIO_SO_MARK, 0x1)
  --cgroup-classid ID         cgroup: net_cls classid (ISTIO_NET_CLS_ID, 0x100001)
  --cgroup-dir DIR            cgroup: the net_cls cgroup to create, also --cgroup DIR
                              (SIDECAR_CGROUP_DIR, /sys/fs/cgroup/net_cls/sidecar-proxy)
  --cgroup-path PATH          cgroup: use the cgroup v2 PATH instead (SIDECAR_CGROUP_PATH)
  --services FILE             explicit: the destinations to capture (SIDECAR_SERVICES)
  --inbound-ports LIST        inbound ports to capture, * = all, "" = none
                              (SIDECAR_INBOUND_PORTS, *)
  --exclude-inbound-ports L   inbound ports never captured (SIDECAR_EXCLUDE_INBOUND_PORTS)
  --exclude-outbound-ports L  outbound ports never captured (SIDECAR_EXCLUDE_OUTBOUND_PORTS)
  --include-cidrs LIST        outbound: capture only these, * = all, "" = none
                              (SIDECAR_INCLUDE_CIDRS, *)
  --exclude-cidrs LIST        outbound destinations never captured (SIDECAR_EXCLUDE_CIDRS)
  --ipv6 auto|on|off          also IPv6 (SIDECAR_IPV6, auto: if the kernel has it)
  --backend B                 auto, nft or legacy (iptables-restore), nft-native
                              (nft -f) (SIDECAR_BACKEND, auto: the one in use)
  --inbound-mode redirect|tproxy
                              inbound by nat REDIRECT, or by TPROXY so that the app
                              sees the client's address (INBOUND_INTERCEPTION_MODE, redirect)
  --tproxy-mark MARK          tproxy: the mark of TPROXY'd packets (INBOUND_TPROXY_MARK, 0x539)
  --tproxy-table N            tproxy: the routing table for it (INBOUND_TPROXY_ROUTE_TABLE, 133)
  --inbound-source S          redirect: pod-ip, or 127.0.0.6 when the proxy connects to the
                              app from there (SIDECAR_INBOUND_SOURCE, pod-ip)
  --drop-invalid              drop TCP packets conntrack finds INVALID
                              (SIDECAR_DROP_INVALID=true)
  --dry-run                   print the iptables-restore (or nft) input, touch nothing
  --check                     exit 0 if the installed rules are the desired ones, else
                              1 and a unified diff (installed -> desired); touch nothing
  --reconcile                 nothing if they are; else replace them, atomically
  -h, --help                  this text

Lists are comma-separated. Exit status: 0 done, 1 failed and rolled back
(--check: the rules differ), 2 bad input (nothing touched). cleanup.sh
removes what this installs.
EOF
}

# dry_run: the input the backend's program would get. With --backend auto
# (which looks at the namespace only when installing) that is
# iptables-restore's.
dry_run() {
	load_renderer "$opt_backend"
	if [ "$opt_backend" = nft-native ]; then
		nft_input
		return 0
	fi
	restore_input 4
	if [ "$ipv6" = true ]; then
		printf '\n'
		restore_input 6
	fi
}

# prepare: what installing and checking need: root, the backend and its
# renderer, the families to touch.
prepare() {
	[ "$(id -u)" = 0 ] || die "$1 needs root (--dry-run does not)"
	choose_backend
	method_check_backend "$backend"
	load_renderer "$backend"
	# IPv6 is touched when it gets rules, and also with --ipv6 off if the
	# namespace has IPv6 and ip6tables is there: an earlier run's IPv6
	# rules must not outlive the option
	touch6="$ipv6"
	if [ "$backend" != nft-native ] && [ "$ipv6" = false ] && has_ipv6; then
		tool 6 save
		if have "$REPLY"; then
			tool 6 restore
			if have "$REPLY"; then touch6=true; fi
		fi
	fi
	if [ "$ipv6" = true ]; then families='IPv4 and IPv6'; else families=IPv4; fi
}

install() {
	prepare "installing rules"
	apply_rules
	printf '%s: installed: method %s, %s, backend %s\n' "$PROG" "$opt_method" "$families" "$backend"
}

# apply_rules: the rules, and the policy routing of --inbound-mode tproxy:
# added before the rules (it only concerns packets with the tproxy mark,
# which nothing sets before the rules are in) and removed again if they
# fail; without tproxy, the routing an earlier run added goes.
apply_rules() {
	route_families=4
	[ "$ipv6" = false ] || route_families='4 6'
	routes_added=''
	if tproxy_on; then
		routes_install "$route_families" || {
			routes_rollback
			fail "$ROUTE_ERR; nothing else was changed"
		}
	fi
	if [ "$opt_inbound_source" != pod-ip ] && [ "$ipv6" = true ]; then
		passthrough6_install || {
			routes_rollback
			fail "$ROUTE_ERR; nothing else was changed"
		}
	fi
	if [ "$backend" = nft-native ]; then
		nft_install
	else
		install_iptables
	fi
	if ! tproxy_on; then
		if has_ipv6; then _ar_all='4 6'; else _ar_all=4; fi
		routes_remove "$_ar_all" || warn "$ROUTE_ERR"
	fi
	if [ "$opt_inbound_source" = pod-ip ] && has_ipv6; then
		passthrough6_remove || warn "$ROUTE_ERR"
	fi
}

# check: --check. Exit 0 if the installed rules are the desired ones, else
# 1 with the diff on stdout.
check() {
	prepare --check
	if compare_installed; then
		printf '%s: in place: the installed rules are the desired ones (method %s, %s, backend %s)\n' \
			"$PROG" "$opt_method" "$families" "$backend"
		return 0
	fi
	fail "drifted: the installed rules differ from the desired ones (the diff on stdout: installed -> desired; --reconcile replaces them)"
}

# reconcile: --reconcile. Nothing if the installed rules are the desired
# ones; else the diff, then the desired rules replace the installed ones,
# in one transaction per family (iptables) or in one (nft-native), so that
# no connection passes uncaptured during the swap.
reconcile() {
	prepare --reconcile
	if compare_installed; then
		printf '%s: in place: nothing to do (method %s, %s, backend %s)\n' "$PROG" "$opt_method" "$families" "$backend"
		return 0
	fi
	apply_rules
	printf '%s: reconciled: the rules above were replaced by the desired ones (method %s, %s, backend %s)\n' \
		"$PROG" "$opt_method" "$families" "$backend"
}

# install_iptables: the iptables backends, one iptables-restore per family.
install_iptables() {
	# the target, rendered before anything is touched (with --ipv6 off the
	# IPv6 target is empty: ours there is removed)
	target4=$(restore_input 4)
	target6=''
	[ "$ipv6" = false ] || target6=$(restore_input 6)
	# the state to come back to if anything fails
	save_rules 4 die
	before4="$REPLY" before6=''
	if [ "$touch6" = true ]; then
		save_rules 6 die
		before6="$REPLY"
	fi
	method_prepare
	install_family 4 "$before4" "$target4"
	[ "$touch6" = false ] || install_family 6 "$before6" "$target6"
}

# install_family 4|6 BEFORE TARGET: one atomic iptables-restore that takes
# our part of the family from BEFORE (its iptables-save output) to TARGET.
install_family() {
	_if_input=$(transition "$2" "$3")
	[ -n "$_if_input" ] || return 0
	restore_rules "$1" "$_if_input" || rollback_and_fail "$RESTORE_ERR"
}

# rollback_and_fail MESSAGE: bring every family back to where it was (one
# table of a family may already be committed, and IPv4 is committed before
# IPv6 is tried), undo the method's set-up, and fail.
rollback_and_fail() {
	_rf_err="$1"
	routes_rollback
	if rollback_family 4 "$before4" && { [ "$touch6" = false ] || rollback_family 6 "$before6"; }; then
		method_rollback
		fail "$_rf_err; rolled back, the rules are as they were"
	fi
	method_rollback
	fail "$_rf_err; rolling back failed too: $RESTORE_ERR"
}

main() {
	options_from_env
	options_parse "$@"
	validate_options
	if [ "$opt_dry_run" = true ]; then
		dry_run
	elif [ "$opt_check" = true ]; then
		check
	elif [ "$opt_reconcile" = true ]; then
		reconcile
	else
		install
	fi
}

main "$@"
