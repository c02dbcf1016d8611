# shellcheck shell=sh
# lib.sh: what redirect.sh and cleanup.sh share. Each of them sets HERE (this
# directory) and sources this file, which names the program and loads the
# rest: addr.sh, rules.sh, restore.sh, apply.sh, apply_nft.sh, check.sh and
# route.sh
# (nft.sh, the other renderer, when the backend is nft-native:
# load_renderer).
#
#   messages      die (exit 2: bad input, nothing touched), fail (exit 1: the
#                 apply went wrong and was rolled back), warn
#   options       every option, the environment variable behind it, its default
#   validation    ports, ids, marks, paths; every message names the culprit
#                 (addresses and networks: addr.sh)
#
# POSIX sh has neither local variables nor arrays. Functions that compute a
# value leave it in REPLY (no subshell, so a die() inside them ends the whole
# script), and their scratch variables carry the function's prefix so that
# they cannot clash.

# The opt_* variables and the constants are set here and read by the other
# files, so on its own this file "assigns unused variables":
# shellcheck disable=SC2034
# and the files it loads are found beside it:
# shellcheck source-path=SCRIPTDIR

PROG="${0##*/}"
. "$HERE/addr.sh"
. "$HERE/rules.sh"
. "$HERE/restore.sh"
. "$HERE/apply.sh"
. "$HERE/apply_nft.sh"
. "$HERE/check.sh"
. "$HERE/route.sh"

# Our chains all start with this; cleanup.sh recognises our objects by it.
CHAIN_PREFIX=SIDECAR_
# With the nft-native backend, all of ours is this one table.
NFT_FAMILY=inet
NFT_TABLE=sidecar_proxy
# --backend: the iptables-restore ones (apply.sh), then nft's (apply_nft.sh)
BACKENDS='auto nft legacy nft-native'
# Every rule we install carries `-m comment --comment "sidecar-proxy: ..."`.
COMMENT_PREFIX=sidecar-proxy
NL='
'

# ---------------------------------------------------------------- messages --

# _one_line TEXT: TEXT with newlines and tabs turned into spaces, in REPLY.
# Init logs are read line by line: an error is always exactly one line.
_one_line() {
	REPLY=$(printf '%s' "$1" | tr '\n\t' '  ')
}

# die MESSAGE: bad input or an unusable environment, found before anything
# was touched. Exit 2.
die() {
	_one_line "$*"
	printf '%s: %s\n' "$PROG" "$REPLY" >&2
	exit 2
}

# fail MESSAGE: applying went wrong after we started touching things (what we
# had changed has been undone by then). Exit 1.
fail() {
	_one_line "$*"
	printf '%s: %s\n' "$PROG" "$REPLY" >&2
	exit 1
}

warn() {
	_one_line "$*"
	printf '%s: warning: %s\n' "$PROG" "$REPLY" >&2
}

# have COMMAND: is COMMAND on PATH?
have() {
	command -v "$1" >/dev/null 2>&1
}

# has_ipv6: does this network namespace have IPv6? It does if the kernel
# lists IPv6 addresses.
has_ipv6() {
	[ -e /proc/net/if_inet6 ]
}

# ----------------------------------------------------------------- options --

# options_from_env: every option's value before the command line is read.
# The first four names and defaults are fixed by the design note; the others
# are ours. An option on the command line beats its variable.
options_from_env() {
	opt_method="${SIDECAR_METHOD:-uid}"
	opt_proxy_port="${ISTIO_PROXY_PORT:-5001}"
	opt_proxy_uid="${ISTIO_PROXY_UID:-1337}"
	opt_proxy_gid="${SIDECAR_PROXY_GID:-}"
	opt_mark="${ISTIO_SO_MARK:-0x1}"
	opt_cgroup_classid="${ISTIO_NET_CLS_ID:-0x100001}"
	opt_cgroup_path="${SIDECAR_CGROUP_PATH:-}"
	opt_cgroup_dir="${SIDECAR_CGROUP_DIR:-/sys/fs/cgroup/net_cls/sidecar-proxy}"
	opt_services="${SIDECAR_SERVICES:-}"
	# These two tell "unset" (everything) from "set but empty" (nothing).
	opt_inbound_ports="${SIDECAR_INBOUND_PORTS-*}"
	opt_include_cidrs="${SIDECAR_INCLUDE_CIDRS-*}"
	opt_exclude_inbound_ports="${SIDECAR_EXCLUDE_INBOUND_PORTS:-}"
	opt_exclude_outbound_ports="${SIDECAR_EXCLUDE_OUTBOUND_PORTS:-}"
	opt_exclude_cidrs="${SIDECAR_EXCLUDE_CIDRS:-}"
	opt_ipv6="${SIDECAR_IPV6:-auto}"
	opt_backend="${SIDECAR_BACKEND:-auto}"
	opt_drop_invalid="${SIDECAR_DROP_INVALID:-false}"
	# Istio's names for the TPROXY settings (INBOUND_INTERCEPTION_MODE, ...)
	opt_inbound_mode="${INBOUND_INTERCEPTION_MODE:-redirect}"
	opt_tproxy_mark="${INBOUND_TPROXY_MARK:-0x539}"
	opt_tproxy_table="${INBOUND_TPROXY_ROUTE_TABLE:-133}"
	opt_inbound_source="${SIDECAR_INBOUND_SOURCE:-pod-ip}"
	opt_dry_run=false
	opt_check=false
	opt_reconcile=false
}

# options_parse ARGS...: the command line over the environment's values.
# Both `--name value` and `--name=value` work; an empty value is a value.
options_parse() {
	while [ "$#" -gt 0 ]; do
		case "$1" in
		-h | --help)
			usage
			exit 0
			;;
		--dry-run) opt_dry_run=true ;;
		--check) opt_check=true ;;
		--reconcile) opt_reconcile=true ;;
		--drop-invalid) opt_drop_invalid=true ;;
		--dry-run=* | --check=* | --reconcile=* | --drop-invalid=* | --help=*)
			die "${1%%=*}: takes no value"
			;;
		--*=*) option_set "${1%%=*}" "${1#*=}" ;;
		--*)
			if option_flag_more "$1"; then
				shift
				continue
			fi
			if [ "$#" -lt 2 ]; then
				option_set "$1" '' # an unknown option is the bigger mistake
				die "$1: needs a value"
			fi
			option_set "$1" "$2"
			shift
			;;
		*) die "unexpected argument: $1 (see --help)" ;;
		esac
		shift
	done
}

# option_set NAME VALUE
option_set() {
	case "$1" in
	--method) opt_method="$2" ;;
	--proxy-port) opt_proxy_port="$2" ;;
	--proxy-uid) opt_proxy_uid="$2" ;;
	--proxy-gid) opt_proxy_gid="$2" ;;
	--mark) opt_mark="$2" ;;
	--cgroup-classid) opt_cgroup_classid="$2" ;;
	--cgroup-path) opt_cgroup_path="$2" ;;
	# --cgroup: the name `sidecar-proxy run --cgroup DIR` uses for the same directory
	--cgroup-dir | --cgroup) opt_cgroup_dir="$2" ;;
	--services) opt_services="$2" ;;
	--inbound-ports) opt_inbound_ports="$2" ;;
	--exclude-inbound-ports) opt_exclude_inbound_ports="$2" ;;
	--exclude-outbound-ports) opt_exclude_outbound_ports="$2" ;;
	--include-cidrs) opt_include_cidrs="$2" ;;
	--exclude-cidrs) opt_exclude_cidrs="$2" ;;
	--ipv6) opt_ipv6="$2" ;;
	--backend) opt_backend="$2" ;;
	--inbound-mode) opt_inbound_mode="$2" ;;
	--tproxy-mark) opt_tproxy_mark="$2" ;;
	--tproxy-table) opt_tproxy_table="$2" ;;
	--inbound-source) opt_inbound_source="$2" ;;
	*) option_set_more "$1" "$2" || die "$1: unknown option (see --help)" ;;
	esac
}

# option_set_more NAME VALUE, option_flag_more NAME: a script's own options
# with a value, and without (validate.sh has some); they fail for an
# unknown NAME.
option_set_more() { return 1; }
option_flag_more() { return 1; }

# -------------------------------------------------------------- validation --

# shown VALUE: VALUE as it should appear in a message, in REPLY.
shown() {
	if [ -z "$1" ]; then REPLY='""'; else REPLY="$1"; fi
}

# check_choice LABEL VALUE CHOICE...: VALUE must be one of the CHOICEs.
check_choice() {
	_cc_label="$1" _cc_value="$2"
	shift 2
	for _cc_choice in "$@"; do
		[ "$_cc_value" = "$_cc_choice" ] && return 0
	done
	shown "$_cc_value"
	_cc_all="$*"
	die "$_cc_label: $REPLY is not one of: $_cc_all"
}

# check_bool LABEL VALUE: true/false (also 1/0, yes/no, on/off), in REPLY.
check_bool() {
	case "$2" in
	true | 1 | yes | on) REPLY=true ;;
	false | 0 | no | off | '') REPLY=false ;;
	*) die "$1: $2 is not true or false" ;;
	esac
}

# _is_plain_number VALUE MAXDIGITS: digits only, no leading zero (a leading
# zero would make shell arithmetic read it as octal), at most MAXDIGITS.
_is_plain_number() {
	case "$1" in
	'' | *[!0-9]* | 0?*) return 1 ;;
	esac
	[ "${#1}" -le "$2" ]
}

# check_port LABEL VALUE: a TCP port, 1-65535.
check_port() {
	if ! _is_plain_number "$2" 5 || [ "$2" -lt 1 ] || [ "$2" -gt 65535 ]; then
		shown "$2"
		die "$1: $REPLY is not a port (1-65535)"
	fi
}

# check_port_list LABEL VALUE: comma-separated ports (blanks ignored), in
# REPLY. An empty list is valid (it means "none").
check_port_list() {
	_cpl_list=$(printf '%s' "$2" | tr -d ' \t')
	for_each , "$_cpl_list" check_port "$1"
	REPLY="$_cpl_list"
}

# check_id LABEL VALUE: a numeric user or group id. Not 0: every connection
# of every root process would bypass the proxy.
check_id() {
	if ! _is_plain_number "$2" 10 || [ "$2" -gt 4294967294 ]; then
		shown "$2"
		die "$1: $REPLY is not a numeric id (1-4294967294)"
	fi
	[ "$2" -ne 0 ] || die "$1: 0 is root: every root process would bypass the proxy"
}

# check_u32 LABEL VALUE WHAT: a non-zero 32-bit number, hex (0x...) or
# decimal, as a decimal in REPLY. Zero is refused: it is the value of every
# unmarked socket and every process outside a net_cls cgroup.
check_u32() {
	case "$2" in
	0[xX]*)
		_cu_hex="${2#0[xX]}"
		case "$_cu_hex" in
		'' | *[!0-9a-fA-F]* | ?????????*) _cu_ok=false ;;
		*) _cu_ok=true ;;
		esac
		;;
	*) if _is_plain_number "$2" 10; then _cu_ok=true; else _cu_ok=false; fi ;;
	esac
	if [ "$_cu_ok" = true ]; then
		REPLY=$(($2))
		[ "$REPLY" -le 4294967295 ] || _cu_ok=false
	fi
	if [ "$_cu_ok" != true ] || [ "$REPLY" -eq 0 ]; then
		shown "$2"
		die "$1: $REPLY is not a $3 (0x1-0xffffffff)"
	fi
}

# check_safe_word LABEL VALUE: VALUE goes into a rule or a path: no blanks,
# quotes, backslashes or other characters that need quoting.
check_safe_word() {
	case "$2" in
	'' | *[!A-Za-z0-9._/@:+=-]*)
		shown "$2"
		die "$1: $REPLY has characters other than letters, digits and ._/@:+=-"
		;;
	esac
}

# check_cgroup_options: --cgroup-classid and --cgroup-dir, read by the
# cgroup method and by cleanup.sh: the classid as a decimal in
# cgroup_classid, the directory without trailing slashes in opt_cgroup_dir.
check_cgroup_options() {
	check_u32 --cgroup-classid "$opt_cgroup_classid" "net_cls classid"
	cgroup_classid="$REPLY"
	check_cgroup_dir --cgroup-dir "$opt_cgroup_dir"
	opt_cgroup_dir="$REPLY"
}

# check_cgroup_dir LABEL VALUE: an absolute path at least two levels deep
# (its parent is the root of a cgroup hierarchy), without trailing slashes,
# in REPLY.
check_cgroup_dir() {
	check_safe_word "$1" "$2"
	_cd_dir="$2"
	while :; do
		case "$_cd_dir" in
		?*/) _cd_dir="${_cd_dir%/}" ;;
		*) break ;;
		esac
	done
	case "$_cd_dir/" in
	*//* | */./* | */../*) die "$1: $2 must be a plain path (no //, . or ..)" ;;
	/*/*/) ;;
	*) die "$1: $2 must be an absolute path below a hierarchy root, like /sys/fs/cgroup/net_cls/sidecar-proxy" ;;
	esac
	REPLY="$_cd_dir"
}

# check_inbound_mode_options: --inbound-mode, --tproxy-mark, --tproxy-table
# and --inbound-source (also read by cleanup.sh): the mark as a decimal in
# tproxy_mark, the table in opt_tproxy_table.
check_inbound_mode_options() {
	# Istio spells them REDIRECT and TPROXY (INBOUND_INTERCEPTION_MODE)
	case "$opt_inbound_mode" in
	REDIRECT) opt_inbound_mode=redirect ;;
	TPROXY) opt_inbound_mode=tproxy ;;
	esac
	check_choice --inbound-mode "$opt_inbound_mode" redirect tproxy
	check_u32 --tproxy-mark "$opt_tproxy_mark" "mark"
	tproxy_mark="$REPLY"
	# 0 (unspec) and 253-255 (default, main, local) are the kernel's own tables
	_ct_ok=false
	if _is_plain_number "$opt_tproxy_table" 10 && [ "$opt_tproxy_table" -le 4294967295 ]; then
		case "$opt_tproxy_table" in
		253 | 254 | 255) ;;
		*) _ct_ok=true ;;
		esac
	fi
	if [ "$_ct_ok" = false ]; then
		shown "$opt_tproxy_table"
		die "--tproxy-table: $REPLY is not a routing table of ours (1-252 or 256-4294967295)"
	fi
	check_choice --inbound-source "$opt_inbound_source" pod-ip 127.0.0.6
	if [ "$opt_inbound_source" != pod-ip ] && [ "$opt_inbound_mode" = tproxy ]; then
		die "--inbound-source: $opt_inbound_source is for --inbound-mode redirect (with tproxy the app sees the client's address)"
	fi
}

# for_each SEP LIST COMMAND...: run `COMMAND... ITEM` for every SEP-separated
# ITEM of LIST, empty items included (so that "80,,443" is caught). Nothing
# for an empty LIST. Not reentrant: COMMAND must not call for_each.
for_each() {
	_fe_sep="$1" _fe_rest="$2"
	shift 2
	[ -n "$_fe_rest" ] || return 0
	while :; do
		"$@" "${_fe_rest%%"$_fe_sep"*}"
		case "$_fe_rest" in
		*"$_fe_sep"*) _fe_rest="${_fe_rest#*"$_fe_sep"}" ;;
		*) return 0 ;;
		esac
	done
}

# for_each_word WORDS COMMAND...: `COMMAND... WORD` for each space-separated
# WORD (our CIDR lists).
for_each_word() {
	_fw_list="$1"
	shift
	for_each ' ' "$_fw_list" "$@"
}

# load_renderer BACKEND: the vocabulary of rules.sh for BACKEND. restore.sh
# (iptables-restore input) is loaded already; nft-native loads nft.sh over it.
load_renderer() {
	# shellcheck source=nft.sh
	[ "$1" != nft-native ] || . "$HERE/nft.sh"
}

# validate_options: every option of redirect.sh (and validate.sh), before
# anything is touched. Leaves the normalised
# values in the opt_* variables and sets inbound and include (all, list or
# none), include4/include6, exclude4/exclude6, drop_invalid and ipv6.
validate_options() {
	# shellcheck disable=SC2086 # METHODS: one word per method
	check_choice --method "$opt_method" $METHODS
	check_choice --ipv6 "$opt_ipv6" auto on off
	# shellcheck disable=SC2086 # BACKENDS: one word per backend
	check_choice --backend "$opt_backend" $BACKENDS
	check_bool --drop-invalid "$opt_drop_invalid"
	drop_invalid="$REPLY"
	case "$opt_dry_run$opt_check$opt_reconcile" in
	*true*true*) die "--dry-run, --check and --reconcile: one at a time" ;;
	esac
	check_port --proxy-port "$opt_proxy_port"
	check_inbound_mode_options

	if [ "$opt_inbound_ports" = '*' ]; then
		inbound=all
	else
		check_port_list --inbound-ports "$opt_inbound_ports"
		opt_inbound_ports="$REPLY"
		if [ -z "$REPLY" ]; then inbound=none; else inbound=list; fi
	fi
	check_port_list --exclude-inbound-ports "$opt_exclude_inbound_ports"
	opt_exclude_inbound_ports="$REPLY"
	check_port_list --exclude-outbound-ports "$opt_exclude_outbound_ports"
	opt_exclude_outbound_ports="$REPLY"

	case "$opt_include_cidrs" in
	'*') include=all ;;
	'') include=none ;;
	*)
		check_cidr_list --include-cidrs "$opt_include_cidrs"
		include=list include4="$REPLY4" include6="$REPLY6"
		;;
	esac
	check_cidr_list --exclude-cidrs "$opt_exclude_cidrs"
	exclude4="$REPLY4" exclude6="$REPLY6"

	case "$opt_ipv6" in
	on) ipv6=true ;;
	off) ipv6=false ;;
	auto) if has_ipv6; then ipv6=true; else ipv6=false; fi ;;
	esac
	if [ "$opt_ipv6" = on ] && [ "$opt_dry_run" = false ] && ! has_ipv6; then
		die "--ipv6: on, but this kernel has no IPv6 here (no /proc/net/if_inet6)"
	fi

	load_method "$opt_method"
	method_validate
}

# ----------------------------------------------------------------- methods --

# The bypass methods (README.md, "Methods"): one file each, method/NAME.sh.
METHODS='uid mark cgroup explicit'

# load_method NAME: load method/NAME.sh. Every method has these functions:
#   method_validate             check this method's options (die on bad input)
#   method_output_bypass 4|6    rules: the proxy's own connections RETURN
#   method_output_capture 4|6   rules: the outbound connections to capture
#   method_bypasses_proxy       succeed if method_output_bypass recognises
#                               every connection the proxy makes
#   method_check_backend B      dies if this method's options cannot work
#                               with backend B (real apply only)
#   method_own_traffic CALLBACK `CALLBACK WHAT TERM` for each match term that
#                               recognises the proxy's connections (what the
#                               bypass rules match; none for explicit)
#   method_prepare              set-up outside iptables before the rules go in
#   method_rollback             undo what method_prepare did in this run
#   method_cleanup              undo method_prepare of an earlier run (cleanup.sh)
# The first two each file defines; for the others these are the defaults,
# which a file redefines where its method differs.
load_method() {
	# shellcheck source=method/cgroup.sh
	. "$HERE/method/$1.sh"
}
method_output_capture() { capture_all_rules "$1"; }
method_bypasses_proxy() { return 0; }
method_own_traffic() { :; }
method_check_backend() { :; }
method_prepare() { :; }
method_rollback() { :; }
method_cleanup() { :; }
