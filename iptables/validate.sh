#!/bin/sh
# validate.sh: does the redirect really work? Run right after redirect.sh,
# with the same options, as root in the pod's network namespace (Istio's
# istio-validation init container does the same job). It sends real
# connections through the rules and looks where they arrive:
#
#   listen    on the proxy port, as the proxy's UID: nc, which takes every
#             connection and writes down the token it brings
#   outbound  per family, UID 0 (an app's UID, not the proxy's) dials a
#             documentation address (203.0.113.250, 2001:db8:ffff::250, port
#             15002; a listed service with --method explicit): the
#             connection must arrive at the listener with its token
#   inbound   the same to the pod's own address, when inbound capture is on
#   bypass    the same dial as the proxy (its UID, its mark, its cgroup): it
#             must not arrive, or the proxy would loop
#
# sh cannot call getsockopt, so it does not read SO_ORIGINAL_DST: the token
# shows that this very connection, made to that address, reached the
# proxy's port, which only a redirect of it can do (`sidecar-proxy
# validate`, the Python twin, reads SO_ORIGINAL_DST itself). The mark
# method's dial gets the mark from a short-lived nft table of its own
# (sidecar_proxy_validate) that marks the probe's packets as SO_MARK would:
# sh cannot set SO_MARK either.
#
# One line per check. Exit 0; or 126 with the first failure and why: the
# module that is absent or the rule that is missing, for which backend and
# family (--explain CHECK:FAMILY prints that reason alone; `sidecar-proxy
# validate` asks it). 2: bad input.
# shellcheck source-path=SCRIPTDIR
# The method files and lib.sh set globals read here (services4, mark_value...):
# shellcheck disable=SC2154
set -eu
HERE="${0%/*}"
[ "$HERE" != "$0" ] || HERE=. # started as `sh validate.sh` in this directory
. "$HERE/lib.sh"

EXIT_INVALID=126
PROBE4_DEFAULT=203.0.113.250
PROBE6_DEFAULT=2001:db8:ffff::250
PROBE_PORT_DEFAULT=15002
# how long a bypass dial is watched: a redirected connection arrives at once
BYPASS_WAIT=1

usage() {
	cat <<'EOF'
usage: validate.sh [redirect.sh's options] [--timeout S] [--probe-v4 ADDR]
                   [--probe-v6 ADDR] [--probe-port PORT]

Check that the installed redirect works: connections of an app's UID reach
the proxy port, the proxy's own do not. Takes redirect.sh's options and
environment (the method, ports, UID, mark, cgroup, services, --ipv6), and:

  --timeout S         how long a dial may take, in seconds (SIDECAR_VALIDATE_TIMEOUT, 5)
  --probe-v4 ADDR     the IPv4 destination dialled (203.0.113.250)
  --probe-v6 ADDR     the IPv6 destination dialled (2001:db8:ffff::250)
  --probe-port PORT   their port (15002)
  -h, --help          this text

One line per check. Exit status: 0 the redirect works, 126 it does not (the
first failure and why), 2 bad input.
EOF
}

option_set_more() {
	case "$1" in
	--timeout) opt_timeout="$2" ;;
	--probe-v4) opt_probe4="$2" ;;
	--probe-v6) opt_probe6="$2" ;;
	--probe-port) opt_probe_port="$2" ;;
	--explain) opt_explain="$2" ;;
	*) return 1 ;;
	esac
}

option_flag_more() {
	case "$1" in
	--plan) opt_plan=true ;;
	*) return 1 ;;
	esac
}

# print_plan: for `sidecar-proxy validate`, which runs the checks itself:
# the settings, then the checks (plan_line), in the order to run them.
print_plan() {
	printf 'proxy_port\t%s\nproxy_uid\t%s\ntimeout\t%s\nbypass_wait\t%s\n' \
		"$opt_proxy_port" "$opt_proxy_uid" "$opt_timeout" "$BYPASS_WAIT"
	case "$opt_method" in
	uid) printf 'proxy\tuid\t%s\n' "$opt_proxy_uid" ;;
	mark) printf 'proxy\tmark\t%s\n' "$mark_value" ;;
	cgroup)
		if [ -n "$opt_cgroup_path" ]; then _pp_kind=cgroup2; else _pp_kind=cgroup; fi
		printf 'proxy\t%s\t%s\n' "$_pp_kind" "$cgroup_procs"
		;;
	*) printf 'proxy\tnone\t\n' ;;
	esac
	printf '%s' "$plan" | sed 's/^/check\t/'
}

# ------------------------------------------------------------------ probes --

# pick_probes: where each check dials, from the options: probe4/probe6 and
# port4/port6 for outbound (empty: nothing of that family is captured),
# inport for inbound.
pick_probes() {
	if ! _is_plain_number "$opt_timeout" 2 || [ "$opt_timeout" -lt 1 ]; then
		shown "$opt_timeout"
		die "--timeout: $REPLY is not a number of seconds (1-99)"
	fi
	check_port --probe-port "$opt_probe_port"
	_pick_host --probe-v4 "$opt_probe4" 4
	probe4="$REPLY"
	_pick_host --probe-v6 "$opt_probe6" 6
	probe6="$REPLY"
	port4="$opt_probe_port" port6="$opt_probe_port"
	if [ "$opt_method" = explicit ]; then
		# only the listed services are captured: dial the first of each family
		_first_service "$services4"
		probe4="$REPLY" port4="$REPLY_PORT"
		_first_service "$services6"
		probe6="$REPLY" port6="$REPLY_PORT"
	elif [ "$include" = none ]; then
		probe4='' probe6=''
	elif [ "$include" = list ]; then
		probe4="${include4%% *}" probe6="${include6%% *}"
		probe4="${probe4%/*}" probe6="${probe6%/*}"
	fi
	case "$inbound" in
	list) inport="${opt_inbound_ports%%,*}" ;;
	*) inport="$opt_probe_port" ;;
	esac
}
_pick_host() {
	check_cidr "$1" "$2"
	[ "$REPLY_FAMILY" = "$3" ] || die "$1: $2 is not an IPv$3 address"
	case "$REPLY" in
	*/32 | */128) REPLY="${REPLY%/*}" ;;
	*) die "$1: $2 is a network; give one address" ;;
	esac
}
_first_service() {
	REPLY='' REPLY_PORT=''
	[ -n "$1" ] || return 0
	_fs_line="${1%%"$NL"*}"
	REPLY="${_fs_line%% *}" REPLY_PORT="${_fs_line#* }"
	REPLY="${REPLY%/*}"
}

# --------------------------------------------------------------- listener --

# start_listener: nc on the proxy port, as the proxy's UID, writing each
# connection's first line to $work/got. Fails (returns 1) if it does not
# come up within the timeout.
start_listener() {
	: >"$work/got"
	chown "$opt_proxy_uid" "$work/got"
	as_proxy $BB nc -ll -p "$opt_proxy_port" -e sh -c "read -r _line; printf '%s\\n' \"\$_line\" >>'$work/got'" \
		</dev/null >/dev/null 2>"$work/listener.err" &
	listener=$!
	# loopback is never captured: this reaches the listener directly
	_sl_token=$(token)
	_sl_i=0
	while [ "$_sl_i" -lt $((opt_timeout * 10)) ]; do
		printf '%s\n' "$_sl_token" | timeout 2 $BB nc -w 1 127.0.0.1 "$opt_proxy_port" >/dev/null 2>&1 || true
		arrived "$_sl_token" && return 0
		kill -0 "$listener" 2>/dev/null || return 1
		sleep 0.1
		_sl_i=$((_sl_i + 1))
	done
	return 1
}

as_proxy() {
	nsenter -S "$opt_proxy_uid" -G "$opt_proxy_uid" "$@"
}



token() {
	cat /proc/sys/kernel/random/uuid
}

arrived() {
	grep -qx "$1" "$work/got"
}

# dial WHO HOST PORT WAIT: connect as WHO (app or proxy) and send a token;
# succeeds if it arrived at the listener within WAIT seconds.
dial() {
	_dl_token=$(token)
	if [ "$1" = proxy ]; then
		printf '%s\n' "$_dl_token" | proxy_runner timeout $(($4 + 1)) $BB nc -w "$4" "$2" "$3" >/dev/null 2>"$work/dial.err" || true
	else
		printf '%s\n' "$_dl_token" | timeout $(($4 + 1)) $BB nc -w "$4" "$2" "$3" >/dev/null 2>"$work/dial.err" || true
	fi
	_dl_i=0
	while [ "$_dl_i" -le $(($4 * 10)) ]; do
		arrived "$_dl_token" && return 0
		sleep 0.1
		_dl_i=$((_dl_i + 1))
	done
	return 1
}

# proxy_runner COMMAND...: run COMMAND as the proxy's traffic looks to the
# rules: with its UID; in its net_cls cgroup, joined the way the proxy joins
# it (as its UID, which owns cgroup.procs); in its cgroup v2 (where the
# runtime puts the proxy: joined as root); or (mark) plainly, with the mark
# table in place.
proxy_runner() {
	# shellcheck disable=SC2016 # $0 and $@ are the inner shell's
	_pr_join='printf "%s\n" "$$" >"$0" && exec "$@"'
	case "$opt_method" in
	uid) as_proxy "$@" ;;
	cgroup)
		if [ -n "$opt_cgroup_path" ]; then
			sh -c "$_pr_join" "$cgroup_procs" "$@"
		else
			as_proxy sh -c "$_pr_join" "$cgroup_procs" "$@"
		fi
		;;
	*) "$@" ;;
	esac
}

# ------------------------------------------------------------------ checks --

ok() { printf '%s: ok: %s\n' "$PROG" "$1"; }
skip() { printf '%s: skip: %s\n' "$PROG" "$1"; }

# invalid CHECK FAMILY WHAT: the first failure, with its reason; exit 126.
invalid() {
	explain "$1" "$2"
	_one_line "$3: $REPLY"
	printf '%s: FAIL: %s\n' "$PROG" "$REPLY" >&2
	exit "$EXIT_INVALID"
}

# plan_family 4|6: the checks of one family, as plan lines (plan_line).
plan_family() {
	_pf_fam="$1"
	if [ "$_pf_fam" = 4 ]; then
		_pf_name=IPv4 _pf_probe="$probe4" _pf_port="$port4" _pf_ip=-4 _pf_default="$PROBE4_DEFAULT"
	else
		_pf_name=IPv6 _pf_probe="$probe6" _pf_port="$port6" _pf_ip=-6 _pf_default="$PROBE6_DEFAULT"
	fi
	# no route out (an IPv4-only pod's IPv6): a connection of this family
	# fails before any rule sees it; nothing to capture. The route's source
	# is the pod's own address.
	if ! _pf_route=$($BB ip "$_pf_ip" -o route get "${_pf_probe:-$_pf_default}" 2>/dev/null); then
		plan_line skip "$_pf_fam" - - "$_pf_name: no route to ${_pf_probe:-$_pf_default}, so no $_pf_name connection to capture"
		return 0
	fi
	_pf_own=$(printf '%s\n' "$_pf_route" | sed -n 's/.* src \([^ ]*\).*/\1/p')

	if [ -z "$_pf_probe" ]; then
		plan_line skip "$_pf_fam" - - "$_pf_name outbound: the rules capture no outbound $_pf_name connection (--include-cidrs, --services)"
	else
		plan_line outbound "$_pf_fam" "$_pf_probe" "$_pf_port" \
			"$_pf_name outbound: $(hostport "$_pf_probe" "$_pf_port") from UID 0"
	fi

	if [ "$inbound" = none ]; then
		plan_line skip "$_pf_fam" - - "$_pf_name inbound: --inbound-ports \"\" (no inbound capture)"
	elif ! method_bypasses_proxy; then
		plan_line skip "$_pf_fam" - - "$_pf_name inbound: the app calling its own pod address is not captured with --method explicit"
	elif [ -z "$_pf_own" ]; then
		plan_line skip "$_pf_fam" - - "$_pf_name inbound: the pod has no $_pf_name address"
	else
		plan_line inbound "$_pf_fam" "$_pf_own" "$inport" \
			"$_pf_name inbound: the pod's own $(hostport "$_pf_own" "$inport") from UID 0"
	fi

	if tproxy_on; then
		plan_line tproxy "$_pf_fam" - - \
			"$_pf_name tproxy: ip rule fwmark $(printf '0x%x' "$tproxy_mark") lookup $opt_tproxy_table, local default dev lo in table $opt_tproxy_table"
	fi

	if ! method_bypasses_proxy; then
		plan_line skip "$_pf_fam" - - "$_pf_name bypass: --method explicit has none (the proxy never dials a listed service)"
	elif [ -n "$_pf_probe" ]; then
		plan_line bypass "$_pf_fam" "$_pf_probe" "$_pf_port" \
			"$_pf_name bypass: $(hostport "$_pf_probe" "$_pf_port") as the proxy ($proxy_is)"
	fi
}

# plan_line CHECK FAMILY HOST PORT WHAT: one check (outbound, inbound,
# bypass or skip: HOST and PORT are "-" then), appended to `plan`, its
# fields separated by tabs.
plan_line() {
	plan="$plan$1$_CK_TAB$2$_CK_TAB$3$_CK_TAB$4$_CK_TAB$5$NL"
}

# run_plan: each check of the plan, one line each; the first failure ends it.
run_plan() {
	while IFS="$_CK_TAB" read -r _rp_check _rp_fam _rp_host _rp_port _rp_what; do
		case "$_rp_check" in
		skip) skip "$_rp_what" ;;
		outbound | inbound)
			if dial app "$_rp_host" "$_rp_port" "$opt_timeout"; then
				ok "$_rp_what reached the proxy port $opt_proxy_port"
			else
				invalid "$_rp_check" "$_rp_fam" "$_rp_what did not reach the proxy port $opt_proxy_port"
			fi
			;;
		tproxy)
			# TPROXY acts on packets from outside, which a probe from inside the pod
			# cannot send: what can be checked is the policy routing it needs
			tproxy_routing_present "$_rp_fam" || invalid tproxy "$_rp_fam" "$_rp_what"
			ok "$_rp_what: present"
			;;
		bypass)
			if [ "$opt_method" = mark ] && ! mark_probe_on "$_rp_fam" "$_rp_host" "$_rp_port"; then
				skip "${_rp_what%%:*}: marking the probe needs nft (sidecar-proxy validate sets SO_MARK itself)"
				continue
			fi
			if dial proxy "$_rp_host" "$_rp_port" "$BYPASS_WAIT"; then
				mark_probe_off
				invalid bypass "$_rp_fam" "$_rp_what came back to the proxy port: the proxy would loop"
			fi
			mark_probe_off
			ok "$_rp_what went out directly"
			;;
		esac
	done <<EOF_PLAN
$plan
EOF_PLAN
}

# tproxy_routing_present 4|6: the rule and the route of --inbound-mode
# tproxy (route.sh); if not, REPLY names the first missing one.
tproxy_routing_present() {
	if ! route_rule_present "$1"; then
		REPLY="ip -$1 rule fwmark $(printf '0x%x' "$tproxy_mark") lookup $opt_tproxy_table"
		return 1
	fi
	route_local_present "$1" && return 0
	REPLY="ip -$1 route local default dev lo table $opt_tproxy_table"
	return 1
}

# mark_probe_on FAMILY HOST PORT: a table of ours that gives the probe's
# packets (UID 0, to HOST PORT) the proxy's mark, before the nat rules see
# them, as SO_MARK would. Fails without nft.
mark_probe_on() {
	have nft || return 1
	if [ "$1" = 4 ]; then _mp_ip=ip; else _mp_ip=ip6; fi
	_mp_err=$(nft -f - 2>&1 <<EOF_NFT
table inet sidecar_proxy_validate {
	chain mark_probe {
		type route hook output priority mangle - 20; policy accept;
		meta skuid 0 $_mp_ip daddr $2 tcp dport $3 meta mark set $mark_value
	}
}
EOF_NFT
) || fail "cannot put the mark on the probe: nft: $_mp_err"
	mark_table=true
}
mark_probe_off() {
	[ "${mark_table:-false}" = true ] || return 0
	nft delete table inet sidecar_proxy_validate 2>/dev/null || true
	mark_table=false
}

hostport() {
	case "$1" in
	*:*) printf '[%s]:%s' "$1" "$2" ;;
	*) printf '%s:%s' "$1" "$2" ;;
	esac
}

# ----------------------------------------------------------------- explain --

# explain CHECK FAMILY: why a check failed, in REPLY: a module that is
# absent (the kernel's own answer, asked without changing anything), else
# the first rule that is missing or stray, else what is left to look at.
explain() {
	_ex_check="$1" _ex_fam="$2"
	if [ "$_ex_check" = tproxy ]; then
		if tproxy_routing_present "$_ex_fam"; then
			REPLY=present
		else
			REPLY="$REPLY is missing: TPROXY'd connections and the app's replies to them would not reach the proxy (redirect.sh --inbound-mode tproxy puts it in)"
		fi
		return 0
	fi
	if [ "$_ex_fam" = 4 ]; then _ex_name=IPv4; else _ex_name=IPv6; fi
	if ! choose_backend_quietly; then
		REPLY="$REPLY ($_ex_name)"
		return 0
	fi
	_ex_where="backend $backend, $_ex_name"
	if absent_module "$_ex_fam"; then
		REPLY="$REPLY is absent ($_ex_where): the rules cannot do their job without it"
		return 0
	fi
	load_renderer "$backend"
	touch6="$ipv6"
	if ! _ex_diff=$(compare_installed); then
		_ex_missing=$(printf '%s\n' "$_ex_diff" | _diff_lines "$_ex_name" '+')
		_ex_stray=$(printf '%s\n' "$_ex_diff" | _diff_lines "$_ex_name" '-')
		if ! _has_ours; then
			REPLY="no rules: nothing of sidecar-proxy is installed ($_ex_where)"
		elif [ -n "$_ex_missing" ]; then
			REPLY="a rule is missing ($_ex_where): ${_ex_missing#"$_CK_TAB"}"
		else
			REPLY="a rule that does not belong is in our chain ($_ex_where): ${_ex_stray#"$_CK_TAB"}"
		fi
		return 0
	fi
	case "$_ex_check" in
	bypass) REPLY="the rules are in place ($_ex_where), the proxy's own connection was captured all the same" ;;
	*) REPLY="the rules are in place ($_ex_where); is the probe excluded (--exclude-cidrs, --exclude-outbound-ports, --exclude-inbound-ports)? pick another with --probe-v4, --probe-v6, --probe-port" ;;
	esac
}

# choose_backend_quietly: choose_backend without dying: REPLY says why not.
choose_backend_quietly() {
	if ! have nft && ! have iptables-save && ! have iptables-nft-save && ! have iptables-legacy-save; then
		REPLY="no iptables and no nft here to look at the rules with"
		return 1
	fi
	choose_backend
}

# _has_ours: is anything of ours installed, in the chosen backend?
_has_ours() {
	if [ "$backend" = nft-native ]; then
		nft_has_table
		return
	fi
	save_rules "$_ex_fam" fail
	[ -n "$(ours_in_save "$REPLY")" ]
}

# _diff_lines FAMILY +|-: the first line of that kind in the diff, without
# its sign. The iptables backends' diff has a section per family: only
# FAMILY's counts; nft's one table has both families.
_diff_lines() {
	_dl_in=true
	while IFS= read -r _dl_line; do
		case "$_dl_line" in
		'--- installed (IPv'*)
			case "$_dl_line" in
			*"($1,"*) _dl_in=true ;;
			*) _dl_in=false ;;
			esac
			;;
		'--- '* | '+++ '*) ;;
		"$2"*)
			# a rule, not a table, chain or set line around rules
			case "${_dl_line#?}" in
			'*'* | ':'* | 'chain '* | 'set '* | '}' | "$_CK_TAB"type* | "$_CK_TAB"element*) continue ;;
			esac
			if [ "$_dl_in" = true ]; then
				printf '%s\n' "${_dl_line#?}"
				return 0
			fi
			;;
		esac
	done
}

# absent_module FAMILY: succeeds, with the module's name in REPLY, if a
# kernel module the rules of this method need is absent. Asked of the
# kernel through the backend's program without changing anything: `-C`
# (is there such a rule?) for iptables, `nft --check` for nft.
absent_module() {
	if [ "$backend" = nft-native ]; then
		# meta skuid, mark and cgroup are part of nf_tables itself
		if ! nft list tables >/dev/null 2>&1; then
			REPLY=nf_tables
			return 0
		fi
		set -- "meta l4proto tcp redirect to :$opt_proxy_port|nft_redir"
		[ -z "$opt_cgroup_path" ] || set -- "$@" "socket transparent 1 return|nft_socket"
		for _am_probe in "$@"; do
			if ! nft -c -f - >/dev/null 2>&1 <<EOF_NFT
table inet sidecar_proxy_probe {
	chain c {
		type nat hook output priority -110; policy accept;
		${_am_probe%|*}
	}
}
EOF_NFT
			then
				REPLY="${_am_probe#*|}"
				return 0
			fi
		done
		return 1
	fi
	tool "$1" save
	_am_tool="${REPLY%-save}"
	case "$opt_method" in
	uid) set -- "-m owner --uid-owner $opt_proxy_uid|xt_owner" ;;
	mark) set -- "-m mark --mark $mark_value|xt_mark" ;;
	cgroup) if [ -n "$opt_cgroup_path" ]; then set -- "-m cgroup --path /|xt_cgroup"; else set -- "-m cgroup --cgroup $cgroup_classid|xt_cgroup"; fi ;;
	*) set -- ;;
	esac
	for _am_probe in "-p tcp -j REDIRECT --to-ports $opt_proxy_port|xt_REDIRECT" "$@"; do
		# shellcheck disable=SC2086 # the probe's words
		_am_out=$("$_am_tool" -w -t nat -C OUTPUT ${_am_probe%|*} 2>&1) || true
		case "$_am_out" in
		*"Couldn't load"* | *"not supported"* | *"No such file or directory"*)
			REPLY="${_am_probe#*|} ($_am_tool: $_am_out)"
			return 0
			;;
		esac
	done
	return 1
}

# ------------------------------------------------------------------- main --

cleanup_work() {
	[ -z "${listener:-}" ] || kill "$listener" 2>/dev/null || true
	mark_probe_off
	[ -z "${work:-}" ] || rm -rf "$work"
}

main() {
	options_from_env
	opt_timeout="${SIDECAR_VALIDATE_TIMEOUT:-5}"
	opt_probe4="$PROBE4_DEFAULT" opt_probe6="$PROBE6_DEFAULT" opt_probe_port="$PROBE_PORT_DEFAULT" opt_explain=''
	opt_plan=false
	options_parse "$@"
	# the options' own checks, not those of the environment: redirect.sh has
	# made that (the cgroup, its mount) already
	opt_dry_run=true
	validate_options
	pick_probes
	# nc and ip are BusyBox's: through the busybox program where there is
	# one (Debian's busybox package puts no applets on PATH; another nc, such
	# as netcat's, takes other flags), else the applets themselves. Without
	# ip every family would look unroutable, and be skipped.
	if have busybox; then BB=busybox; else BB=''; fi
	for _tool in ip nc; do
		have busybox || have "$_tool" || die "$_tool not found (validate.sh needs BusyBox's nc, nsenter, timeout and ip)"
	done
	case "$opt_method" in
	mark) proxy_is="mark $mark_hex" ;;
	cgroup)
		if [ -n "$opt_cgroup_path" ]; then
			cgroup_procs=$(sed -n 's/^[^ ]* \([^ ]*\) cgroup2 .*/\1/p' /proc/self/mounts | head -n 1)$opt_cgroup_path/cgroup.procs
			proxy_is="cgroup $opt_cgroup_path"
		else
			cgroup_procs="$opt_cgroup_dir/cgroup.procs"
			proxy_is="net_cls cgroup $opt_cgroup_dir"
		fi
		;;
	*) proxy_is="UID $opt_proxy_uid" ;;
	esac
	if [ -n "$opt_explain" ]; then
		explain "${opt_explain%%:*}" "${opt_explain#*:}"
		printf '%s\n' "$REPLY"
		return 0
	fi
	plan=''
	plan_family 4
	[ "$ipv6" = false ] || plan_family 6
	if [ "$opt_plan" = true ]; then
		print_plan
		return 0
	fi
	[ "$(id -u)" = 0 ] || die "validating needs root (it dials as other users and reads the rules)"
	for _tool in nsenter timeout mktemp; do
		have "$_tool" || die "$_tool not found (validate.sh needs BusyBox's nc, nsenter, timeout and ip)"
	done
	work=$(mktemp -d)
	chmod 0755 "$work"
	trap cleanup_work EXIT
	trap 'exit 130' INT TERM
	if ! start_listener; then
		_one_line "$(cat "$work/listener.err")"
		printf '%s: FAIL: cannot listen on port %s as UID %s: %s\n' "$PROG" "$opt_proxy_port" "$opt_proxy_uid" "$REPLY" >&2
		exit "$EXIT_INVALID"
	fi
	ok "listening on port $opt_proxy_port as UID $opt_proxy_uid"
	run_plan
	if [ "$ipv6" = true ]; then _mn_families='IPv4 and IPv6'; else _mn_families=IPv4; fi
	printf '%s: passed: the redirect works (method %s, %s)\n' "$PROG" "$opt_method" "$_mn_families"
}

main "$@"
