#!/bin/sh
# cleanup.sh: remove what redirect.sh installed, and nothing else.
#
# What is ours is recognisable (apply.sh): the SIDECAR_* chains and the
# jumps from built-in chains into them. They are removed in both families
# and both iptables backends, one iptables-restore per family and backend,
# so other people's rules and chains are never touched; with nft-native,
# ours is one table, deleted whole (apply_nft.sh). Then each method undoes
# its own set-up (the cgroup method removes the net_cls cgroup it created),
# and the policy routing of --inbound-mode tproxy goes (route.sh).
#
# Tolerant and idempotent: whatever is already gone is skipped, and running
# it twice is running it once. It takes redirect.sh's command line and
# environment (it reads --backend, --ipv6, --cgroup-dir, --cgroup-classid
# and --dry-run, and ignores the rest), so the same invocation undoes it.
#
# Exit status: 0 done; 1 a removal failed; 2 bad input, nothing touched.
# shellcheck source-path=SCRIPTDIR
set -eu
HERE="${0%/*}"
[ "$HERE" != "$0" ] || HERE=. # started as `sh cleanup.sh` in this directory
. "$HERE/lib.sh"

usage() {
	cat <<'EOF'
usage: cleanup.sh [options]

Remove the rules (and the net_cls cgroup) that redirect.sh installed;
nothing else. Takes redirect.sh's options and environment; uses these:

  --backend B                 auto, nft, legacy or nft-native; auto: every backend
                              present (SIDECAR_BACKEND)
  --ipv6 auto|on|off          auto: IPv6 too if the kernel has it (SIDECAR_IPV6)
  --cgroup-dir DIR            the cgroup to remove if its classid is ours (or --cgroup)
                              (SIDECAR_CGROUP_DIR, /sys/fs/cgroup/net_cls/sidecar-proxy)
  --cgroup-classid ID         (ISTIO_NET_CLS_ID, 0x100001)
  --tproxy-mark MARK          the policy routing rule to remove: fwmark MARK
                              (INBOUND_TPROXY_MARK, 0x539)
  --tproxy-table N            ... lookup N, and the local route in table N
                              (INBOUND_TPROXY_ROUTE_TABLE, 133)
  --dry-run                   print the iptables-restore (or nft) input, remove nothing
  -h, --help                  this text

Exit status: 0 done, 1 a removal failed, 2 bad input (nothing touched).
EOF
}

validate() {
	# shellcheck disable=SC2086 # BACKENDS: one word per backend
	check_choice --backend "$opt_backend" $BACKENDS
	check_choice --ipv6 "$opt_ipv6" auto on off
	check_cgroup_options
	check_inbound_mode_options
	case "$opt_ipv6" in
	off) ipv6=false ;;
	*) if has_ipv6; then ipv6=true; else ipv6=false; fi ;;
	esac
}

# cleanup_backend nft|legacy|plain: remove ours from both families of one
# backend. With --backend auto a backend that is not installed is skipped.
cleanup_backend() {
	backend="$1"
	tool 4 save
	if ! have "$REPLY"; then
		[ "$opt_backend" = auto ] || die "$REPLY not found: install iptables (backend $backend)"
		return 0
	fi
	for_each_family cleanup_family
}

cleanup_family() {
	tool "$1" save
	have "$REPLY" || return 0
	save_rules "$1" fail
	_cf_save="$REPLY"
	_cf_input=$(transition "$_cf_save" '')
	[ -n "$_cf_input" ] || return 0
	if [ "$opt_dry_run" = true ]; then
		if [ "$1" = 4 ]; then _cf_name=IPv4; else _cf_name=IPv6; fi
		printf '# ==== sidecar-proxy %s removal, backend %s ====\n%s\n' "$_cf_name" "$backend" "$_cf_input"
		return 0
	fi
	restore_rules "$1" "$_cf_input" || fail "$RESTORE_ERR"
	# a table that only our rules were in is empty now: most likely we made it
	table_names "$(ours_in_save "$_cf_save")"
	drop_emptied_tables "$1" "$REPLY"
}

# cleanup_routes: the policy routing of --inbound-mode tproxy (route.sh),
# for the mark and table of --tproxy-mark and --tproxy-table.
cleanup_routes() {
	if has_ipv6; then _cr_all='4 6'; else _cr_all=4; fi
	if [ "$opt_dry_run" = true ]; then
		_cr_have=$(routes_listing "$_cr_all" ours)
		[ -z "$_cr_have" ] || printf '# ==== sidecar-proxy policy routing removal ====\n%s\n' "$_cr_have"
		! passthrough6_ours || printf '# would delete ::6/128 from lo (--inbound-source 127.0.0.6)\n'
		return 0
	fi
	routes_remove "$_cr_all" || fail "$ROUTE_ERR"
	! has_ipv6 || passthrough6_remove || fail "$ROUTE_ERR"
}

main() {
	options_from_env
	options_parse "$@"
	validate
	[ "$(id -u)" = 0 ] || die "reading and removing rules needs root"
	if [ "$opt_backend" = auto ]; then
		if have iptables-nft-save || have iptables-legacy-save; then
			cleanup_backend nft
			cleanup_backend legacy
		elif have iptables-save; then
			cleanup_backend plain
		fi
		! have nft || nft_cleanup
	elif [ "$opt_backend" = nft-native ]; then
		have nft || die "nft not found: install nftables (backend nft-native)"
		nft_cleanup
	else
		cleanup_backend "$opt_backend"
	fi
	cleanup_routes
	# Every method undoes its own set-up; each file defines the same
	# function names, hence one subshell per method.
	for _method in $METHODS; do
		(
			load_method "$_method"
			method_cleanup
		)
	done
}

main "$@"
