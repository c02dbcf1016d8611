# shellcheck shell=sh
# restore.sh: the rule set as iptables-restore input. rules.sh and the
# method files describe the rules in a small vocabulary of functions (table,
# why, rule, rules_per_ports, hook) and match terms (rules.sh lists them);
# this file defines those functions for iptables-restore and is the only
# one that knows how iptables spells a rule. A renderer for another backend
# would define the same functions.
#
# Each table is collected, then written: its chain declarations first, then
# the rules of our chains, then the hooks (the text reads "build the chains,
# then hook them in"; the table is one commit either way). The declarations are derived from the rules, as istio-iptables'
# builder does it: every chain of ours that a rule is in or jumps to, in the
# order the rules first name them. So a chain exists exactly when a rule
# uses it, and nobody keeps a list of them.
#
# Every rule is written the way iptables-save prints it (option order, /32
# masks, the comment match last), so that the dry run and the installed
# rules compare as plain text.

# Loaded by lib.sh; redirect.sh and lib.sh set the options read here:
# shellcheck disable=SC2154

# restore_input 4|6: the complete restore input for one address family.
restore_input() {
	if [ "$1" = 4 ]; then _ri_prog=iptables-restore _ri_any=0.0.0.0; else _ri_prog=ip6tables-restore _ri_any=::; fi
	printf '# ==== sidecar-proxy IPv%s rules (method %s): input for %s --noflush ====\n' \
		"$1" "$opt_method" "$_ri_prog"
	_rs_table=''
	family_rules "$1"
	_restore_commit
}

# table NAME: the rules that follow go into table NAME.
table() {
	_restore_commit
	_rs_table="$1" _rs_chains='' _rs_rules='' _rs_hooks=''
}

# _restore_commit: write the table collected so far, if any.
_restore_commit() {
	[ -n "$_rs_table" ] || return 0
	printf '*%s\n%s%s%sCOMMIT\n' "$_rs_table" "$_rs_chains" "$_rs_rules" "$_rs_hooks"
	_rs_table=''
}

# _restore_uses CHAIN: a rule names CHAIN. The first time, if it is ours,
# declare it (iptables-restore creates it, or flushes it if it exists).
# Built-in chains and targets (RETURN, DROP, ...) need no declaration.
_restore_uses() {
	case "$1" in
	"$CHAIN_PREFIX"*) ;;
	*) return 0 ;;
	esac
	case "$_rs_chains" in
	*":$1 "*) ;;
	*) _rs_chains="$_rs_chains:$1 - [0:0]$NL" ;;
	esac
}

# why TEXT: the intent of the rule(s) below, as a comment line of the
# restore input (iptables-restore skips lines that start with #).
why() {
	_rs_rules="$_rs_rules# $1$NL"
}

# rule CHAIN WHAT TARGET [TERM...]: append one rule to our CHAIN.
rule() {
	_restore_rule "$@"
	_rs_rules="$_rs_rules$REPLY"
}

# hook BUILTIN CHAIN WHAT WHY: the TCP packets of the built-in chain BUILTIN
# enter our CHAIN, the only rule we put in a built-in chain. Written after
# the rules of our chains.
hook() {
	_restore_rule "$1" "$3" "$2" tcp
	_rs_hooks="$_rs_hooks# Hook: $4$NL$REPLY"
}

# _restore_rule CHAIN WHAT TARGET [TERM...]: the -A line, in REPLY. It
# carries `-m comment --comment "sidecar-proxy: WHAT"`, last, where
# iptables-save puts it.
_restore_rule() {
	_restore_uses "$1"
	_restore_uses "$3"
	_rr_chain="$1" _rr_what="$2"
	_restore_target "$3"
	_rr_target="$REPLY"
	shift 3
	_restore_matches "$@"
	REPLY="-A $_rr_chain ${REPLY:+$REPLY }-m comment --comment \"$COMMENT_PREFIX: $_rr_what\" -j $_rr_target$NL"
}

# rules_per_ports CHAIN PORTS WHAT TARGET: TCP connections to any of the
# comma-separated PORTS, in as few rules as multiport allows (15 ports
# each); a lone port uses the plain tcp match. WHAT is singular ("excluded
# inbound port"); each rule's comment names its ports.
rules_per_ports() {
	_rp_chain="$1" _rp_what="$3" _rp_target="$4" _rp_batch='' _rp_n=0
	for_each , "$2" _rules_per_ports_add
	_rules_per_ports_flush
}
_rules_per_ports_add() {
	_rp_batch="${_rp_batch:+$_rp_batch,}$1"
	_rp_n=$((_rp_n + 1))
	[ "$_rp_n" -lt "$MULTIPORT_MAX" ] || _rules_per_ports_flush
}
_rules_per_ports_flush() {
	case "$_rp_batch" in
	'') return 0 ;;
	*,*) rule "$_rp_chain" "${_rp_what}s $_rp_batch" "$_rp_target" "ports=$_rp_batch" ;;
	*) rule "$_rp_chain" "$_rp_what $_rp_batch" "$_rp_target" "port=$_rp_batch" ;;
	esac
	_rp_batch='' _rp_n=0
}

# multiport takes at most 15 ports per rule.
MULTIPORT_MAX=15

# rules_per_destinations CHAIN WHAT TARGET DESTS: TCP to any of DESTS
# ("CIDR PORT" per line, one family), one rule each; WHAT is singular
# ("service"), each rule's comment names its destination.
rules_per_destinations() {
	_rd_chain="$1" _rd_what="$2" _rd_target="$3"
	while IFS=' ' read -r _rd_cidr _rd_port; do
		[ -n "$_rd_cidr" ] || continue
		case "$_rd_cidr" in
		*:*) _rd_dest="[${_rd_cidr%/128}]:$_rd_port" ;;
		*) _rd_dest="${_rd_cidr%/32}:$_rd_port" ;;
		esac
		rule "$_rd_chain" "$_rd_what $_rd_dest" "$_rd_target" "to=$_rd_cidr" "port=$_rd_port"
	done <<EOF_DESTS
$4
EOF_DESTS
}

# _restore_target TARGET: the target as iptables writes it, in REPLY.
_restore_target() {
	case "$1" in
	REDIRECT=*) REPLY="REDIRECT --to-ports ${1#REDIRECT=}" ;;
	ZONE=*) REPLY="CT --zone-orig ${1#ZONE=}" ;;
	TPROXY=*) REPLY="TPROXY --on-port ${1#TPROXY=} --on-ip $_ri_any --tproxy-mark $(printf '0x%x' "$tproxy_mark")/0xffffffff" ;;
	CONNMARK=save) REPLY="CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff" ;;
	CONNMARK=restore) REPLY="CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff" ;;
	*) REPLY="$1" ;;
	esac
}

# _restore_matches TERM...: the match terms (rules.sh) as iptables-save
# writes them, in REPLY. The terms come in iptables-save's order.
_restore_matches() {
	REPLY=''
	for _rm_term; do
		_rm_value="${_rm_term#*=}"
		case "$_rm_term" in
		tcp) _rm_text='-p tcp' ;;
		port=*) _rm_text="-p tcp -m tcp --dport $_rm_value" ;;
		ports=*) _rm_text="-p tcp -m multiport --dports $_rm_value" ;;
		from=*) _rm_text="-s $_rm_value" ;;
		# a match on every address: iptables-save omits it, so do we
		to=*/0) _rm_text='' ;;
		to=*) _rm_text="-d $_rm_value" ;;
		!to=*) _rm_text="! -d $_rm_value" ;;
		in=*) _rm_text="-i $_rm_value" ;;
		out=*) _rm_text="-o $_rm_value" ;;
		uid=*) _rm_text="-m owner --uid-owner $_rm_value" ;;
		gid=*) _rm_text="-m owner --gid-owner $_rm_value" ;;
		# iptables-save prints marks in hex
		mark=*) _rm_text="-m mark --mark $(printf '0x%x' "$_rm_value")" ;;
		connmark=*) _rm_text="-m connmark --mark $(printf '0x%x' "$_rm_value")" ;;
		classid=*) _rm_text="-m cgroup --cgroup $_rm_value" ;;
		cgroup-path=*) _rm_text="-m cgroup --path \"$_rm_value\"" ;;
		ctstate=*) _rm_text="-m conntrack --ctstate $_rm_value" ;;
		*) fail "internal error: no iptables match for the term $_rm_term" ;;
		esac
		[ -z "$_rm_text" ] || REPLY="${REPLY:+$REPLY }$_rm_text"
	done
}
