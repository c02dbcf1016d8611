# shellcheck shell=sh
# check.sh: redirect.sh --check and --reconcile. Are the installed rules the
# desired ones? Both sides are brought into a normal form and compared; a
# difference is shown as a unified diff (installed -> desired).
#
# The normal form keeps what decides where a packet goes and drops what
# does not: the `#` lines (the kernel keeps none), the counters' figures,
# the order of chains and tables, the order of set elements, the spelling
# of an nft priority (`dstnat - 10` is -110), and where our jumps sit among
# other people's rules in a built-in chain. The order of the rules inside
# each of our chains is kept: it is what the rules mean (a bypass after the
# capture-all would loop).

# Loaded by lib.sh; redirect.sh and lib.sh set the options and other
# globals read here:
# shellcheck disable=SC2154

_CK_TAB=$(printf '\t')

# compare_installed: 0 if the installed rules are the desired ones; 1 if
# not, with the unified diff on stdout. For the chosen backend (`backend`).
compare_installed() {
	_id_dir=$(mktemp -d) || fail "--check: cannot make a temporary directory"
	_id_status=0
	if [ "$backend" = nft-native ]; then
		nft_listing
		normal_nft "$REPLY" >"$_id_dir/installed"
		normal_nft "$(nft_input)" >"$_id_dir/desired"
		_check_pair "$_id_dir" "table $NFT_FAMILY $NFT_TABLE" || _id_status=1
	else
		for _id_family in 4 6; do
			[ "$_id_family" = 4 ] || [ "$touch6" = true ] || continue
			save_rules "$_id_family" fail
			normal_iptables "$(ours_in_save "$REPLY")" >"$_id_dir/installed"
			if [ "$_id_family" = 4 ] || [ "$ipv6" = true ]; then
				normal_iptables "$(restore_input "$_id_family")" >"$_id_dir/desired"
			else
				: >"$_id_dir/desired" # --ipv6 off: none of ours in IPv6
			fi
			_check_pair "$_id_dir" "IPv$_id_family" || _id_status=1
		done
	fi
	# the policy routing of --inbound-mode tproxy (route.sh)
	if [ "$touch6" = true ] || { [ "$backend" = nft-native ] && has_ipv6; }; then _id_rf='4 6'; else _id_rf=4; fi
	routes_listing "$_id_rf" >"$_id_dir/installed"
	if [ "$ipv6" = true ]; then routes_desired '4 6'; else routes_desired 4; fi >"$_id_dir/desired"
	_check_pair "$_id_dir" "policy routing" || _id_status=1
	rm -rf "$_id_dir"
	return "$_id_status"
}

# _check_pair DIR WHAT: diff DIR/installed and DIR/desired.
_check_pair() {
	diff -u -L "installed ($2, backend $backend)" -L "desired ($2)" "$1/installed" "$1/desired" && return 0
	[ "$?" = 1 ] || fail "--check: diff failed"
	return 1
}

# normal_iptables TEXT: our part of iptables-save output, or restore input,
# in the normal form: per table, our chain declarations and rules, chain by
# chain in name order, each chain's rules in their order.
normal_iptables() {
	printf '%s\n' "$1" | {
		_ni_table='' _ni_seq=0
		while IFS= read -r _ni_line; do
			_ni_seq=$((_ni_seq + 1))
			case "$_ni_line" in
			'*'*)
				_ni_table="${_ni_line#\*}"
				printf '%s\t\t0\t%s\n' "$_ni_table" "$_ni_line"
				;;
			':'*)
				_ni_chain="${_ni_line#:}"
				_ni_chain="${_ni_chain%% *}"
				printf '%s\t%s\t0\t:%s\n' "$_ni_table" "$_ni_chain" "$_ni_chain"
				;;
			'-A '*)
				_ni_chain="${_ni_line#-A }"
				printf '%s\t%s\t%s\t%s\n' "$_ni_table" "${_ni_chain%% *}" "$_ni_seq" "$_ni_line"
				;;
			esac
		done
	} | sort -t "$_CK_TAB" -k1,1 -k2,2 -k3,3n | cut -f4-
}

# normal_nft TEXT: our table, as `nft list` prints it or as nft.sh writes
# it, in the normal form: sets and chains in name order, each chain's
# rules in their order, a set's elements one a line and sorted, counters
# without figures, priorities as numbers.
normal_nft() {
	printf '%s\n' "$1" | sed 's/counter packets [0-9]* bytes [0-9]*/counter/' | _normal_nft_lines |
		sort -t "$_CK_TAB" -k1,1 -k2,2n -k3 | cut -f3-
}

# _normal_nft_lines: stdin to "BLOCK<TAB>SEQ<TAB>LINE" lines, for sort.
_normal_nft_lines() {
	_nn_in=false _nn_block='' _nn_seq=0 _nn_elements=''
	while IFS= read -r _nn_line; do
		case "$_nn_line" in
		"table $NFT_FAMILY $NFT_TABLE {")
			_nn_in=true
			continue
			;;
		esac
		[ "$_nn_in" = true ] || continue
		_nn_line="${_nn_line#"${_nn_line%%[![:space:]]*}"}"
		_nn_seq=$((_nn_seq + 1))
		if [ -n "$_nn_elements" ]; then
			_nn_elements="$_nn_elements $_nn_line"
			case "$_nn_line" in
			*'}') _normal_nft_elements ;;
			esac
			continue
		fi
		case "$_nn_line" in
		'' | '#'*) ;;
		'}')
			if [ -z "$_nn_block" ]; then
				_nn_in=false
			else
				printf '%s\t999999999\t}\n' "$_nn_block"
				_nn_block=''
			fi
			;;
		'chain '*' {' | 'set '*' {')
			_nn_block="${_nn_line% \{}"
			printf '%s\t0\t%s {\n' "$_nn_block" "$_nn_block"
			;;
		'elements = { '*)
			_nn_elements="${_nn_line#elements = \{ }"
			case "$_nn_line" in
			*'}') _normal_nft_elements ;;
			esac
			;;
		'type '*' priority '*)
			_normal_nft_priority "$_nn_line"
			printf '%s\t%s\t\t%s\n' "$_nn_block" "$_nn_seq" "$REPLY"
			;;
		*) printf '%s\t%s\t\t%s\n' "$_nn_block" "$_nn_seq" "$_nn_line" ;;
		esac
	done
}

# _normal_nft_elements: the collected elements, one a line, all with the
# same sequence number (sort orders them by their text).
_normal_nft_elements() {
	_ne_rest="${_nn_elements%\}}"
	_nn_elements=''
	while [ -n "$_ne_rest" ]; do
		_ne_one="${_ne_rest%%,*}"
		case "$_ne_rest" in
		*,*) _ne_rest="${_ne_rest#*,}" ;;
		*) _ne_rest='' ;;
		esac
		_ne_one="${_ne_one#"${_ne_one%%[![:space:]]*}"}"
		_ne_one="${_ne_one%"${_ne_one##*[![:space:]]}"}"
		[ -z "$_ne_one" ] || printf '%s\t%s\t\telement %s\n' "$_nn_block" "$_nn_seq" "$_ne_one"
	done
}

# _normal_nft_priority LINE: a base chain's `type ... priority P; policy
# ...;` with P as a number, in REPLY (nft prints a standard priority by its
# name, `dstnat - 10`, some versions for some hooks only).
_normal_nft_priority() {
	_np_head="${1%% priority *}"
	_np_prio="${1#* priority }"
	_np_tail="${_np_prio#*;}"
	_np_prio="${_np_prio%%;*}"
	# shellcheck disable=SC2086 # the priority's words: NAME [+|- N] or N
	set -- $_np_prio
	case "$1" in
	raw) _np_value=-300 ;;
	mangle) _np_value=-150 ;;
	dstnat) _np_value=-100 ;;
	filter) _np_value=0 ;;
	security) _np_value=50 ;;
	srcnat) _np_value=100 ;;
	*) _np_value="$1" ;;
	esac
	case "$#:${2-}" in
	'3:-') _np_value=$((_np_value - $3)) ;;
	'3:+') _np_value=$((_np_value + $3)) ;;
	esac
	REPLY="$_np_head priority $_np_value;$_np_tail"
}
