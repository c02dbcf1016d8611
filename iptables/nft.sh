# shellcheck shell=sh
# nft.sh: the rule set as input for `nft -f`, the native nftables backend
# (--backend nft-native). rules.sh and the method files describe the rules
# in a small vocabulary (table, why, rule, rules_per_ports,
# rules_per_destinations, hook); restore.sh writes that for iptables-restore,
# this file for nft. redirect.sh loads it over restore.sh when the backend
# is nft-native. Pure: it never runs nft (apply_nft.sh does).
#
# Theory of operation. Everything goes into one table, `inet sidecar_proxy`,
# replaced whole in one transaction: create it if missing, delete it, build
# it again. `inet` is IPv4 and IPv6 at once, so rules.sh is run for both
# families and the two rule lists are merged chain by chain: a rule without
# an address (the bypass, lo, ports, capture-all, the hooks) is the same in
# both and is written once; a rule with one (`ip daddr`, `ip6 daddr`)
# matches its own family only, so both are written, each family's in its
# own order. Should a rule without an address stand where the other family
# has another, it is written for its family alone (`meta nfproto ipv4`).
# With one family only, the base chains admit that family alone.
#
# Every rule carries a counter and a comment ("sidecar-proxy: WHAT"); a
# `# why` line above it says why it is there. The explicit method's services
# are a named set per family (an address . port, with intervals when a
# network is listed), looked up by one rule: 10,000 services are one rule.
# Port lists are anonymous sets (one rule, no 15-port limit).
#
# The built-in chains of iptables (hook) become base chains of the table,
# each ten before the iptables table of its kind, so that the order is
# ours, not an accident of who registered first (iptables/README.md,
# "The nft-native backend"):
#   nat_prerouting    type nat hook prerouting priority dstnat - 10  (-110)
#   nat_output        type nat hook output priority -110
#   raw_output        type filter hook output priority raw - 10      (-310)
#   mangle_prerouting type filter hook prerouting priority mangle - 10 (-160)
#   mangle_output     type route hook output priority mangle - 10      (-160)
#
# The text is written the way `nft list table` prints it (tabs, the order
# of terms, a host address without its /32 or /128, marks in 8 hex digits,
# sorted ports, the comment last), plus the `# why` lines and `counter`
# without its figures, so that the installed table can be compared with the
# desired one (nft_normal_form, for --check).

# Loaded by redirect.sh; it and lib.sh set the options read here:
# shellcheck disable=SC2154

# the fields of a rule entry are separated by US, its why lines by RS
_NF_US=$(printf '\037')
_NF_RS=$(printf '\036')
_NF_TAB=$(printf '\t')

# nft_input: the complete input for nft -f, both families in one table.
nft_input() {
	if [ "$ipv6" = true ]; then _ni_families='IPv4 and IPv6'; else _ni_families=IPv4; fi
	printf '# ==== sidecar-proxy rules (method %s, %s): input for nft -f ====\n' "$opt_method" "$_ni_families"
	printf '# One transaction replaces our table whole: create it if missing, delete it, build it again.\n'
	printf 'table %s %s\n' "$NFT_FAMILY" "$NFT_TABLE"
	printf 'delete table %s %s\n' "$NFT_FAMILY" "$NFT_TABLE"
	_nf_chains='' _nf_bases='' _nf_sets=''
	for _nf_family in 4 6; do
		[ "$_nf_family" = 4 ] || [ "$ipv6" = true ] || continue
		_nf_pending='' _nf_table='' _nf_last_chain=''
		family_rules "$_nf_family"
		[ -z "$_nf_pending" ] || _nf_add "$_nf_last_chain" n ''
	done
	_nf_write_table
}

# ------------------------------------------------------------ vocabulary --

# table NAME: the iptables table the rules below belong to. One nft table
# holds them all; NAME decides the type and priority of the hooks.
table() {
	_nf_table="$1"
}

# why TEXT: the intent of the rule(s) below.
why() {
	_nf_pending="${_nf_pending:+$_nf_pending$_NF_RS}$1"
}

# rule CHAIN WHAT TARGET [TERM...]: one rule in our CHAIN.
rule() {
	_nf_rule_text "$@"
	_nf_add "$1" "$REPLY_KEY" "$REPLY"
}

# rules_per_ports CHAIN PORTS WHAT TARGET: one rule for all the ports, an
# anonymous set of them (sorted, as nft lists it) when there are several.
rules_per_ports() {
	_rp_ports=$(printf '%s\n' "$2" | tr ',' '\n' | sort -n -u | tr '\n' ',')
	_rp_ports="${_rp_ports%,}"
	case "$_rp_ports" in
	*,*)
		# nft keeps a comment of 128 bytes at most
		if [ "${#_rp_ports}" -le 80 ]; then _rp_what="${3}s $_rp_ports"; else _rp_what="${3}s, $(_nf_count , "$_rp_ports") of them"; fi
		rule "$1" "$_rp_what" "$4" "ports=$_rp_ports"
		;;
	*) rule "$1" "$3 $_rp_ports" "$4" "port=$_rp_ports" ;;
	esac
}

# rules_per_destinations CHAIN WHAT TARGET DESTS: TCP to any of DESTS
# ("CIDR PORT" per line, one family): a named set of address . port, and
# one rule that looks the destination up in it.
rules_per_destinations() {
	_rd_set="SIDECAR_SERVICES_V$_nf_family"
	# one sed over all of them (a variable grown a line at a time in sh
	# costs the square of its length): a host without its /32 or /128
	_rd_elements=$(printf '%s\n' "$4" | sed -e '/^$/d' -e 's#/32 # #' -e 's#/128 # #' -e 's# # . #')
	_rd_n=$(printf '%s\n' "$_rd_elements" | grep -c .)
	case "$_rd_elements" in
	*/*) _rd_interval=true ;; # a network: the set needs intervals
	*) _rd_interval=false ;;
	esac
	eval "_nf_set_elements_$_nf_family=\$_rd_elements _nf_set_interval_$_nf_family=\$_rd_interval"
	_nf_sets="$_nf_sets$_nf_family "
	if [ "$_nf_family" = 4 ]; then _rd_ip=ip; else _rd_ip=ip6; fi
	_nf_declare "$1"
	_nf_uses "$3"
	_nf_target "$3"
	_nf_add "$1" f "$_rd_ip daddr . tcp dport @$_rd_set counter $REPLY comment \"$COMMENT_PREFIX: ${2}s in the set $_rd_set, $_rd_n of them\""
}

# hook BUILTIN CHAIN WHAT WHY: a base chain of ours on BUILTIN's hook sends
# its TCP packets to our CHAIN.
hook() {
	# whys that no rule followed belong at the end of the chain being hooked
	[ -z "$_nf_pending" ] || _nf_add "$2" n ''
	case "$_nf_table $1" in
	# written as nft lists them (a name where nft knows one for the hook)
	'nat PREROUTING') _hk_base=nat_prerouting _hk_info='type nat hook prerouting priority dstnat - 10' ;;
	'nat OUTPUT') _hk_base=nat_output _hk_info='type nat hook output priority -110' ;;
	'raw OUTPUT') _hk_base=raw_output _hk_info='type filter hook output priority raw - 10' ;;
	'mangle PREROUTING') _hk_base=mangle_prerouting _hk_info='type filter hook prerouting priority mangle - 10' ;;
	# a route chain: a mark set here routes the packet again, as in iptables' mangle OUTPUT
	'mangle OUTPUT') _hk_base=mangle_output _hk_info='type route hook output priority mangle - 10' ;;
	*) fail "internal error: no nft hook for table $_nf_table, chain $1" ;;
	esac
	case "$NL$_nf_bases" in
	*"$NL$_hk_base$NL"*) ;;
	*)
		_nf_bases="$_nf_bases$_hk_base$NL"
		eval "_nf_info_$_hk_base=\$_hk_info"
		;;
	esac
	why "Hook: $4"
	# with one family only, the base chains admit that family alone
	if [ "$ipv6" = true ]; then _hk_family=''; else _hk_family='meta nfproto ipv4 '; fi
	_nf_add "$_hk_base" '*' "${_hk_family}meta l4proto tcp counter jump $2 comment \"$COMMENT_PREFIX: $3\""
}

# --------------------------------------------------------------- entries --

# _nf_add CHAIN KEY TEXT: append a rule (or, with KEY n and no TEXT, the
# pending whys alone) to the current family's list of CHAIN, with the whys
# pending. KEY: * a rule without an address, f one with, n whys only.
_nf_add() {
	_nf_declare "$1"
	eval "_nf_rules_${_nf_family}_$1=\"\${_nf_rules_${_nf_family}_$1-}\$2\$_NF_US\$_nf_pending\$_NF_US\$3\$NL\""
	_nf_pending='' _nf_last_chain="$1"
}

# _nf_declare CHAIN: CHAIN is one of the table's chains; the regular ones
# come in the order the rules first name them, as in restore.sh.
_nf_declare() {
	case "$NL$_nf_chains$_nf_bases" in
	*"$NL$1$NL"*) ;;
	*) _nf_chains="$_nf_chains$1$NL" ;;
	esac
}

# _nf_uses TARGET: a rule jumps to TARGET; declare it if it is our chain.
_nf_uses() {
	case "$1" in
	"$CHAIN_PREFIX"*) _nf_declare "$1" ;;
	esac
}

# _nf_rule_text CHAIN WHAT TARGET [TERM...]: the rule as nft lists it, in
# REPLY; REPLY_KEY is f if it names an address (one family), * if not.
_nf_rule_text() {
	_nf_declare "$1"
	_nf_uses "$3"
	_rt_what="$2"
	_nf_target "$3"
	_rt_verdict="$REPLY"
	shift 3
	_rt_has_port=false
	for _rt_term; do
		case "$_rt_term" in
		port=* | ports=*) _rt_has_port=true ;;
		esac
	done
	REPLY_KEY='*' _rt_text=''
	for _rt_term; do
		_rt_value="${_rt_term#*=}"
		case "$_rt_term" in
		# tcp dport implies it; nft lists the dependency only where it is alone
		tcp) if [ "$_rt_has_port" = true ]; then continue; fi; _rt_match='meta l4proto tcp' ;;
		port=*) _rt_match="tcp dport $_rt_value" ;;
		ports=*) _rt_match="tcp dport { $(printf '%s' "$_rt_value" | sed 's/,/, /g') }" ;;
		from=*) _nf_address saddr "$_rt_value" ;;
		to=*) _nf_address daddr "$_rt_value" ;;
		!to=*) _nf_address 'daddr !=' "$_rt_value" ;;
		in=*) _rt_match="iifname \"$_rt_value\"" ;;
		out=*) _rt_match="oifname \"$_rt_value\"" ;;
		uid=*) _rt_match="meta skuid $_rt_value" ;;
		gid=*) _rt_match="meta skgid $_rt_value" ;;
		mark=*) _rt_match="meta mark $(printf '0x%08x' "$_rt_value")" ;;
		connmark=*) _rt_match="ct mark $(printf '0x%08x' "$_rt_value")" ;;
		classid=*) _rt_match="meta cgroup $_rt_value" ;;
		cgroup-path=*) _nf_cgroupv2 "$_rt_value" ;;
		ctstate=INVALID) _rt_match='ct state invalid' ;;
		ctstate=RELATED,ESTABLISHED) _rt_match='ct state established,related' ;;
		*) fail "internal error: no nft match for the term $_rt_term" ;;
		esac
		_rt_text="${_rt_text:+$_rt_text }$_rt_match"
	done
	REPLY="${_rt_text:+$_rt_text }counter $_rt_verdict comment \"$COMMENT_PREFIX: $_rt_what\""
}

# _nf_address saddr|daddr|'daddr !=' CIDR: the address match in _rt_match;
# marks the rule as one family's. A match on every address of a family is
# that family.
_nf_address() {
	REPLY_KEY=f
	case "$2" in
	*:*) _na_ip=ip6 _na_proto=ipv6 ;;
	*) _na_ip=ip _na_proto=ipv4 ;;
	esac
	case "$2" in
	*/0) _rt_match="meta nfproto $_na_proto" ;;
	*/32 | */128) _rt_match="$_na_ip $1 ${2%/*}" ;;
	*) _rt_match="$_na_ip $1 $2" ;;
	esac
}

# _nf_cgroupv2 PATH: `socket cgroupv2 level N "PATH"` in _rt_match, PATH
# without its leading and trailing slashes, N its depth below the root.
# (nft looks PATH up below /sys/fs/cgroup when the rule goes in.)
_nf_cgroupv2() {
	_cv_path="$1"
	while :; do
		case "$_cv_path" in
		/*) _cv_path="${_cv_path#/}" ;;
		*/) _cv_path="${_cv_path%/}" ;;
		*) break ;;
		esac
	done
	_rt_match="socket cgroupv2 level $(_nf_count / "$_cv_path") \"$_cv_path\""
}

# _nf_count SEP LIST: how many SEP-separated items LIST has, on stdout.
_nf_count() {
	printf '%s\n' "$2" | tr "$1" '\n' | grep -c .
}

# _nf_target TARGET: the verdict or statement as nft writes it, in REPLY.
_nf_target() {
	case "$1" in
	RETURN) REPLY='return' ;;
	DROP) REPLY='drop' ;;
	REDIRECT=*) REPLY="redirect to :${1#REDIRECT=}" ;;
	ZONE=*) REPLY="ct original zone set ${1#ZONE=}" ;;
	# inet: the port alone, the address stays the packet's (either family)
	TPROXY=*) REPLY="meta mark set $(printf '0x%08x' "$tproxy_mark") tproxy to :${1#TPROXY=} accept" ;;
	CONNMARK=save) REPLY='ct mark set meta mark' ;;
	CONNMARK=restore) REPLY='meta mark set ct mark' ;;
	"$CHAIN_PREFIX"*) REPLY="jump $1" ;;
	*) fail "internal error: no nft verdict for the target $1" ;;
	esac
}

# ---------------------------------------------------------------- output --

_nf_write_table() {
	printf 'table %s %s {\n' "$NFT_FAMILY" "$NFT_TABLE"
	_wt_sep=''
	for _wt_family in 4 6; do
		case " $_nf_sets" in
		*" $_wt_family "*) ;;
		*) continue ;;
		esac
		printf '%s' "$_wt_sep"
		_nf_write_set "$_wt_family"
		_wt_sep="$NL"
	done
	while IFS= read -r _wt_chain; do
		[ -n "$_wt_chain" ] || continue
		printf '%s\tchain %s {\n' "$_wt_sep" "$_wt_chain"
		eval "_wt_info=\${_nf_info_$_wt_chain-}"
		[ -z "$_wt_info" ] || printf '\t\t%s; policy accept;\n' "$_wt_info"
		_nf_merge "$_wt_chain"
		printf '\t}\n'
		_wt_sep="$NL"
	done <<EOF_CHAINS
$_nf_chains$_nf_bases
EOF_CHAINS
	printf '}\n'
}

_nf_write_set() {
	eval "_ws_elements=\$_nf_set_elements_$1 _ws_interval=\$_nf_set_interval_$1"
	if [ "$1" = 4 ]; then _ws_type=ipv4_addr; else _ws_type=ipv6_addr; fi
	printf '\tset SIDECAR_SERVICES_V%s {\n\t\ttype %s . inet_service\n' "$1" "$_ws_type"
	[ "$_ws_interval" = false ] || printf '\t\tflags interval\n'
	# one element a line, the way nft lists them
	_ws_elements=$(printf '%s\n' "$_ws_elements" | sed -e '$!s/$/,/' -e "2,\$s/^/$_NF_TAB$_NF_TAB$_NF_TAB     /")
	printf '\t\telements = { %s }\n\t}\n' "$_ws_elements"
}

# _nf_merge CHAIN: the rules of both families in CHAIN, merged (see the
# theory of operation), with their why lines.
_nf_merge() {
	eval "_mg_4=\${_nf_rules_4_$1-} _mg_6=\${_nf_rules_6_$1-}"
	_mg_last=''
	while [ -n "$_mg_4" ] || [ -n "$_mg_6" ]; do
		_mg_h4="${_mg_4%%"$NL"*}" _mg_h6="${_mg_6%%"$NL"*}"
		if [ -n "$_mg_4" ] && [ "${_mg_h4%%"$_NF_US"*}" != '*' ]; then
			_nf_emit "$_mg_h4" ''
			_mg_4="${_mg_4#*"$NL"}"
		elif [ -n "$_mg_6" ] && [ "${_mg_h6%%"$_NF_US"*}" != '*' ]; then
			_nf_emit "$_mg_h6" ''
			_mg_6="${_mg_6#*"$NL"}"
		elif [ -n "$_mg_4" ] && [ -n "$_mg_6" ] && [ "${_mg_h4##*"$_NF_US"}" = "${_mg_h6##*"$_NF_US"}" ]; then
			_nf_emit "$_mg_h4" ''
			_mg_4="${_mg_4#*"$NL"}" _mg_6="${_mg_6#*"$NL"}"
		elif [ -n "$_mg_4" ]; then
			_nf_emit "$_mg_h4" ipv4
			_mg_4="${_mg_4#*"$NL"}"
		else
			_nf_emit "$_mg_h6" ipv6
			_mg_6="${_mg_6#*"$NL"}"
		fi
	done
}

# _nf_emit ENTRY ipv4|ipv6|'': write an entry: its why lines (each unless
# it was the last one written), then the rule, for one family if given and
# the table has both.
_nf_emit() {
	_em_rest="${1#*"$_NF_US"}"
	_em_whys="${_em_rest%%"$_NF_US"*}"
	_em_text="${_em_rest#*"$_NF_US"}"
	while [ -n "$_em_whys" ]; do
		_em_why="${_em_whys%%"$_NF_RS"*}"
		case "$_em_whys" in
		*"$_NF_RS"*) _em_whys="${_em_whys#*"$_NF_RS"}" ;;
		*) _em_whys='' ;;
		esac
		[ "$_em_why" = "$_mg_last" ] || printf '\t\t# %s\n' "$_em_why"
		_mg_last="$_em_why"
	done
	[ -n "$_em_text" ] || return 0
	if [ -n "$2" ] && [ "$ipv6" = true ]; then _em_text="meta nfproto $2 $_em_text"; fi
	printf '\t\t%s\n' "$_em_text"
}
