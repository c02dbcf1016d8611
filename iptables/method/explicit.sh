# shellcheck shell=sh
# method explicit: no bypass at all. Only the destinations listed in the
# services file are captured, one REDIRECT rule each (the design note's
# method 4); every other outbound connection goes out directly. Nothing
# tells the proxy's own connections apart, so the proxy must never connect to
# a listed destination itself: list service addresses (virtual IPs) and let
# the proxy connect to their endpoints. Interface: load_method in lib.sh.
#
# Services file (what `sidecar-proxy services --config FILE` prints), one
# destination per line:
#   198.51.100.10:80          an address and a port
#   198.51.100.0/24:443       a network and a port
#   [2001:db8::10]:80         IPv6, in brackets
#   [2001:db8::/64]:443
# Blank lines and everything after a # are ignored.

# Loaded by load_method (lib.sh); redirect.sh, cleanup.sh and lib.sh set
# the options and other globals read here:
# shellcheck disable=SC2154

method_validate() {
	[ -n "$opt_services" ] || die "--services: --method explicit needs a services file (--services FILE)"
	[ "$include" = all ] || die "--include-cidrs: does not apply to --method explicit (the services file lists what is captured)"
	if [ ! -f "$opt_services" ] || [ ! -r "$opt_services" ]; then
		die "--services: $opt_services: no such readable file"
	fi
	# Each line checked here, written out as "FAMILY CIDR PORT" and gathered
	# by the command substitution: a shell variable grown a line at a time
	# costs the square of its length (10,000 services took seconds). A bad
	# line ends the subshell with die's exit status (2), and so the script.
	_ms_all=$(_services_lines <"$opt_services") || exit "$?"
	services4=$(printf '%s\n' "$_ms_all" | sed -n 's/^4 //p')
	services6=$(printf '%s\n' "$_ms_all" | sed -n 's/^6 //p')
}

# _services_lines: every line of the services file on stdin, checked.
_services_lines() {
	_ms_lineno=0
	while IFS= read -r _ms_line || [ -n "$_ms_line" ]; do
		_ms_lineno=$((_ms_lineno + 1))
		_services_line "$_ms_line"
	done
}

# _services_line LINE: check one line (the _ms_lineno-th) and write it out
# as "FAMILY CIDR PORT", unless it is blank or a comment.
_services_line() {
	_sl_line="${1%%#*}"
	# trim leading and trailing blanks
	_sl_line="${_sl_line#"${_sl_line%%[![:space:]]*}"}"
	_sl_line="${_sl_line%"${_sl_line##*[![:space:]]}"}"
	[ -n "$_sl_line" ] || return 0
	_sl_where="--services $opt_services line $_ms_lineno"
	case "$_sl_line" in
	\[*\]:*)
		_sl_addr="${_sl_line#\[}"
		_sl_addr="${_sl_addr%\]:*}"
		_sl_port="${_sl_line##*\]:}"
		case "$_sl_addr" in
		*:*) ;;
		*) die "$_sl_where: \"$_sl_line\": brackets are for IPv6 only" ;;
		esac
		;;
	*:*:*) die "$_sl_where: \"$_sl_line\": write an IPv6 destination as [ADDRESS]:PORT" ;;
	?*:?*)
		_sl_addr="${_sl_line%:*}"
		_sl_port="${_sl_line##*:}"
		;;
	*) die "$_sl_where: \"$_sl_line\" is not IP:PORT, CIDR:PORT or [IPv6]:PORT" ;;
	esac
	check_port "$_sl_where" "$_sl_port"
	check_cidr "$_sl_where" "$_sl_addr"
	if [ "$REPLY_FAMILY" = 6 ] && [ "$opt_ipv6" = off ]; then
		die "$_sl_where: $_sl_addr is IPv6 but --ipv6 is off"
	fi
	printf '%s %s %s\n' "$REPLY_FAMILY" "$REPLY" "$_sl_port"
}

method_bypasses_proxy() { return 1; }

method_output_bypass() {
	why "No bypass rule: only the listed services are captured, and the proxy never connects to them itself (it connects to their endpoints). For the same reason the app calling its own pod IP is not captured: nothing would tell the proxy's own connection to the pod IP apart."
}

method_output_capture() {
	family_words "$1" "$services4" "$services6"
	if [ -z "$REPLY" ]; then
		why "The services file lists no $fam_name destination: no outbound $fam_name connection is captured."
		return 0
	fi
	why "The listed services (--services) go through the proxy; every other destination is reached directly."
	rules_per_destinations SIDECAR_OUTPUT service SIDECAR_REDIRECT "$REPLY"
}
