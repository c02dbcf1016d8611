# shellcheck shell=sh
# addr.sh: IPv4 and IPv6 addresses and networks, checked and written back in
# the canonical text iptables-save prints (so that a dry run and the
# installed rules compare as plain text). Addresses are parsed into
# space-separated decimal words: 4 bytes for IPv4, 8 16-bit groups for IPv6.
# Conventions as in lib.sh: results in REPLY, scratch variables prefixed.

# Loaded by lib.sh; redirect.sh and lib.sh set the options read here:
# shellcheck disable=SC2154

# check_cidr LABEL VALUE: an IPv4 or IPv6 address or network. REPLY is its
# canonical form, written the way iptables-save prints it (so that the
# dry-run and the installed rules compare as plain text), REPLY_FAMILY is 4
# or 6. A network with host bits set is refused rather than silently masked.
check_cidr() {
	_ck_label="$1" _ck_value="$2"
	shown "$_ck_value"
	_ck_shown="$REPLY"
	case "$_ck_value" in
	*/) die "$_ck_label: $_ck_shown: a prefix length must follow the /" ;;
	*/*) _ck_addr="${_ck_value%/*}" _ck_len="${_ck_value##*/}" ;;
	*) _ck_addr="$_ck_value" _ck_len='' ;;
	esac
	case "$_ck_addr" in
	*:*)
		REPLY_FAMILY=6
		_ipv6_parse "$_ck_addr" || die "$_ck_label: $_ck_shown is not an IPv6 address or network"
		_ck_max=128
		;;
	*)
		REPLY_FAMILY=4
		_ipv4_parse "$_ck_addr" || die "$_ck_label: $_ck_shown is not an IPv4 address or network"
		_ck_max=32
		;;
	esac
	_ck_words="$REPLY"
	[ -n "$_ck_len" ] || _ck_len="$_ck_max"
	if ! _is_plain_number "$_ck_len" 3 || [ "$_ck_len" -gt "$_ck_max" ]; then
		die "$_ck_label: $_ck_shown: prefix length must be 0-$_ck_max"
	fi
	if [ "$REPLY_FAMILY" = 4 ]; then
		_network "$_ck_words" "$_ck_len" 8 .
		[ "$REPLY" = "$_ck_addr" ] ||
			die "$_ck_label: $_ck_shown has host bits set (the network is $REPLY/$_ck_len)"
	else
		_network "$_ck_words" "$_ck_len" 16 ' '
		_ck_net="$REPLY"
		_ipv6_format "$_ck_words" || die "$_ck_label: $_ck_shown: IPv4-mapped and IPv4-compatible addresses are not supported; write the IPv4 address"
		_ck_canon="$REPLY"
		_ipv6_format "$_ck_net" || die "$_ck_label: $_ck_shown: IPv4-mapped and IPv4-compatible addresses are not supported; write the IPv4 address"
		[ "$REPLY" = "$_ck_canon" ] ||
			die "$_ck_label: $_ck_shown has host bits set (the network is $REPLY/$_ck_len)"
	fi
	REPLY="$REPLY/$_ck_len"
}

# check_cidr_list LABEL VALUE: comma-separated CIDRs (blanks ignored), split
# by family: REPLY4 and REPLY6 hold the canonical forms, space-separated.
check_cidr_list() {
	_ccl_label="$1"
	REPLY4='' REPLY6=''
	for_each , "$(printf '%s' "$2" | tr -d ' \t')" _cidr_list_add
}
_cidr_list_add() {
	check_cidr "$_ccl_label" "$1"
	if [ "$REPLY_FAMILY" = 4 ]; then
		REPLY4="${REPLY4:+$REPLY4 }$REPLY"
	else
		[ "$opt_ipv6" != off ] || die "$_ccl_label: $REPLY is IPv6 but --ipv6 is off"
		REPLY6="${REPLY6:+$REPLY6 }$REPLY"
	fi
}

# _ipv4_parse ADDR: four decimal bytes without leading zeros, in REPLY.
_ipv4_parse() {
	_p4_rest="$1." REPLY='' _p4_n=0
	while [ -n "$_p4_rest" ]; do
		_p4_byte="${_p4_rest%%.*}"
		_p4_rest="${_p4_rest#*.}"
		_is_plain_number "$_p4_byte" 3 && [ "$_p4_byte" -le 255 ] || return 1
		REPLY="${REPLY:+$REPLY }$_p4_byte"
		_p4_n=$((_p4_n + 1))
	done
	[ "$_p4_n" -eq 4 ]
}

# _network WORDS LEN WIDTH SEP: WORDS (WIDTH-bit words, 8 for IPv4, 16 for
# IPv6) with the bits past the prefix length LEN cleared, joined by SEP, in
# REPLY.
_network() {
	_nw_rest="$1 " _nw_bit=0 REPLY=''
	while [ -n "$_nw_rest" ]; do
		_nw_word="${_nw_rest%% *}"
		_nw_rest="${_nw_rest#* }"
		if [ "$2" -le "$_nw_bit" ]; then
			_nw_word=0
		elif [ "$2" -lt $((_nw_bit + $3)) ]; then
			_nw_word=$((_nw_word & ~((1 << ($3 - ($2 - _nw_bit))) - 1)))
		fi
		_nw_bit=$((_nw_bit + $3))
		REPLY="${REPLY:+$REPLY$4}$_nw_word"
	done
}

# _ipv6_parse ADDR: the eight 16-bit groups of ADDR (hex, at most one "::",
# no embedded IPv4), as decimals, in REPLY.
_ipv6_parse() {
	case "$1" in
	'' | *[!0-9A-Fa-f:]* | *:::* | *::*::*) return 1 ;;
	*::*)
		_ipv6_groups "${1%%::*}" || return 1
		_p6_head="$REPLY" _p6_n="$_g_n"
		_ipv6_groups "${1#*::}" || return 1
		_p6_tail="$REPLY" _p6_fill=$((8 - _p6_n - _g_n))
		[ "$_p6_fill" -ge 1 ] || return 1
		while [ "$_p6_fill" -gt 0 ]; do
			_p6_head="${_p6_head:+$_p6_head }0"
			_p6_fill=$((_p6_fill - 1))
		done
		REPLY="$_p6_head${_p6_tail:+ $_p6_tail}"
		;;
	*)
		_ipv6_groups "$1" || return 1
		[ "$_g_n" -eq 8 ] || return 1
		;;
	esac
}

# _ipv6_groups "a:b:c": 1-4 hex digits per group, as decimals in REPLY, the
# number of groups in _g_n. An empty string is zero groups.
_ipv6_groups() {
	REPLY='' _g_n=0 _g_rest="$1"
	[ -n "$_g_rest" ] || return 0
	_g_rest="$_g_rest:"
	while [ -n "$_g_rest" ]; do
		_g="${_g_rest%%:*}"
		_g_rest="${_g_rest#*:}"
		case "$_g" in
		'' | ?????*) return 1 ;;
		esac
		REPLY="${REPLY:+$REPLY }$((0x$_g))"
		_g_n=$((_g_n + 1))
	done
}

# _ipv6_format WORDS: the text form of RFC 5952 (and of glibc's inet_ntop,
# which iptables-save uses): lowercase, no leading zeros, the longest run of
# two or more zero groups (the first, on a tie) written as "::". Fails for
# the IPv4-mapped/-compatible forms, which inet_ntop writes with a dotted tail.
_ipv6_format() {
	# find the longest run of zero groups
	_f6_rest="$1 " _f6_i=0 _f6_run=0 _f6_best=-1 _f6_bestlen=0
	while [ -n "$_f6_rest" ]; do
		_f6_word="${_f6_rest%% *}"
		_f6_rest="${_f6_rest#* }"
		if [ "$_f6_word" -eq 0 ]; then
			_f6_run=$((_f6_run + 1))
			if [ "$_f6_run" -gt "$_f6_bestlen" ]; then
				_f6_bestlen="$_f6_run" _f6_best=$((_f6_i - _f6_run + 1))
			fi
		else
			_f6_run=0
		fi
		[ "$_f6_i" -ne 5 ] || _f6_word5="$_f6_word"
		_f6_i=$((_f6_i + 1))
	done
	[ "$_f6_bestlen" -ge 2 ] || _f6_best=-1
	if [ "$_f6_best" -eq 0 ]; then
		[ "$_f6_bestlen" -ne 6 ] || return 1
		[ "$_f6_bestlen" -ne 5 ] || [ "$_f6_word5" -ne 65535 ] || return 1
	fi
	# write the groups, the zero run as "::"
	_f6_rest="$1 " _f6_i=0 REPLY=''
	while [ -n "$_f6_rest" ]; do
		_f6_word="${_f6_rest%% *}"
		_f6_rest="${_f6_rest#* }"
		if [ "$_f6_i" -eq "$_f6_best" ]; then
			REPLY="$REPLY::"
		elif [ "$_f6_best" -lt 0 ] || [ "$_f6_i" -lt "$_f6_best" ] ||
			[ "$_f6_i" -ge $((_f6_best + _f6_bestlen)) ]; then
			case "$REPLY" in
			'' | *:) ;;
			*) REPLY="$REPLY:" ;;
			esac
			REPLY="$REPLY$(printf '%x' "$_f6_word")"
		fi
		_f6_i=$((_f6_i + 1))
	done
}
