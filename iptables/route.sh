# shellcheck shell=sh
# route.sh: the policy routing of --inbound-mode tproxy, the only part that
# runs `ip`. A packet with the tproxy mark is delivered to this host,
# whatever its destination:
#
#   ip rule add fwmark MARK lookup TABLE           (and ip -6)
#   ip route add local default dev lo table TABLE  (and ip -6)
#
# (Istio's tools/istio-iptables: the same two, mark 1337 and table 133 by
# default.) It is what lets the TPROXY'd connection reach the proxy, and the
# app's replies to the client's address, marked again by CONNMARK, come
# back to the proxy instead of leaving for the client.
#
# Installed with the rules, removed by cleanup.sh and by a re-run that no
# longer wants them; a rule or route that is there already is left as it is
# (a re-run adds nothing), and a failed install removes what this run added.
#
# Ours carry routing protocol ROUTE_PROTO (`ip rule ... protocol`, `ip route
# ... proto`), and only those are removed: a rule or route that someone else
# put there, the same but for the protocol (Istio's init step installs the
# same two), is left, before us and after cleanup.sh.

# Loaded by lib.sh; redirect.sh and lib.sh set the options read here, and
# the scripts read ROUTE_ERR; BB is one word or none:
# shellcheck disable=SC2154,SC2034,SC2086

ROUTE_PROTO=83 # ours; not one of iproute2's named protocols (/etc/iproute2/rt_protos)

# route_rule_present 4|6: is `fwmark MARK lookup TABLE` there? (The whole
# list is read: BusyBox's ip neither filters nor lists one table's IPv6
# routes, and ends its lines with a blank.) ${BB:-}: validate.sh runs ip
# through the busybox program.
# Any protocol: BusyBox's ip shows none.
route_rule_present() {
	${BB:-} ip "-$1" rule show 2>/dev/null |
		grep -Eq "fwmark $(printf '0x%x' "$tproxy_mark") lookup $opt_tproxy_table( proto [a-z0-9_]+)? *\$"
}

# route_rule_ours 4|6: is it there with our protocol?
route_rule_ours() {
	ip "-$1" rule show 2>/dev/null | grep -q "fwmark $(printf '0x%x' "$tproxy_mark") lookup $opt_tproxy_table proto $ROUTE_PROTO *\$"
}

# route_local_present 4|6: is the `local default dev lo` route in TABLE (any protocol)?
route_local_present() {
	${BB:-} ip "-$1" route show table all 2>/dev/null | grep -q "^local default dev lo table $opt_tproxy_table "
}

# route_local_ours 4|6: is it there with our protocol?
route_local_ours() {
	ip "-$1" route show table all 2>/dev/null | grep -q "^local default dev lo table $opt_tproxy_table proto $ROUTE_PROTO "
}

# routes_install FAMILIES: the rule and the route for each family (4, 6)
# that lacks them; what was added is in routes_added (for routes_rollback).
routes_install() {
	routes_added=''
	for _ri_f in $1; do
		if ! route_rule_present "$_ri_f"; then
			_ri_err=$(ip "-$_ri_f" rule add fwmark "$tproxy_mark" lookup "$opt_tproxy_table" protocol "$ROUTE_PROTO" 2>&1) ||
				return_route_error "ip -$_ri_f rule add fwmark $tproxy_mark lookup $opt_tproxy_table: $_ri_err" || return 1
			routes_added="$routes_added rule$_ri_f"
		fi
		if ! route_local_present "$_ri_f"; then
			_ri_err=$(ip "-$_ri_f" route add local default dev lo table "$opt_tproxy_table" proto "$ROUTE_PROTO" 2>&1) ||
				return_route_error "ip -$_ri_f route add local default dev lo table $opt_tproxy_table: $_ri_err" || return 1
			routes_added="$routes_added route$_ri_f"
		fi
	done
}

# return_route_error MESSAGE: keep MESSAGE (one line) in ROUTE_ERR; fails.
return_route_error() {
	_one_line "$1"
	ROUTE_ERR="$REPLY"
	return 1
}

# routes_rollback: remove what routes_install added in this run.
routes_rollback() {
	for _rr_what in ${routes_added:-}; do
		case "$_rr_what" in
		rule*) ip "-${_rr_what#rule}" rule del fwmark "$tproxy_mark" lookup "$opt_tproxy_table" \
			protocol "$ROUTE_PROTO" 2>/dev/null || : ;;
		route*) ip "-${_rr_what#route}" route del local default dev lo table "$opt_tproxy_table" \
			proto "$ROUTE_PROTO" 2>/dev/null || : ;;
		addr6) ip -6 addr del ::6/128 dev lo 2>/dev/null || : ;;
		esac
	done
	routes_added=''
}

# routes_remove FAMILIES: cleanup.sh, and a re-run without tproxy: every
# copy of our rule and route goes (not another protocol's); what is not
# there is skipped. Returns 1 with ROUTE_ERR if ip refuses.
routes_remove() {
	for _rm_f in $1; do
		while route_rule_ours "$_rm_f"; do
			_rm_err=$(ip "-$_rm_f" rule del fwmark "$tproxy_mark" lookup "$opt_tproxy_table" protocol "$ROUTE_PROTO" 2>&1) ||
				return_route_error "ip -$_rm_f rule del fwmark $tproxy_mark lookup $opt_tproxy_table protocol $ROUTE_PROTO: $_rm_err" || return 1
		done
		if route_local_ours "$_rm_f"; then
			_rm_err=$(ip "-$_rm_f" route del local default dev lo table "$opt_tproxy_table" proto "$ROUTE_PROTO" 2>&1) ||
				return_route_error "ip -$_rm_f route del local default dev lo table $opt_tproxy_table proto $ROUTE_PROTO: $_rm_err" || return 1
		fi
	done
}

# routes_listing FAMILIES [ours]: what is installed, in the form routes_desired
# writes (for --check: of any protocol, as routes_install counts it there;
# `ours`: only ours, what routes_remove would remove).
routes_listing() {
	for _rl_f in $1; do
		if [ "${2:-}" = ours ]; then
			! route_rule_ours "$_rl_f" || printf 'ip -%s rule fwmark %s lookup %s\n' "$_rl_f" "$(printf '0x%x' "$tproxy_mark")" "$opt_tproxy_table"
			! route_local_ours "$_rl_f" || printf 'ip -%s route local default dev lo table %s\n' "$_rl_f" "$opt_tproxy_table"
		else
			! route_rule_present "$_rl_f" || printf 'ip -%s rule fwmark %s lookup %s\n' "$_rl_f" "$(printf '0x%x' "$tproxy_mark")" "$opt_tproxy_table"
			! route_local_present "$_rl_f" || printf 'ip -%s route local default dev lo table %s\n' "$_rl_f" "$opt_tproxy_table"
		fi
	done
}

# routes_desired FAMILIES: the policy routing the options want.
routes_desired() {
	tproxy_on || return 0
	for _rd_f in $1; do
		printf 'ip -%s rule fwmark %s lookup %s\n' "$_rd_f" "$(printf '0x%x' "$tproxy_mark")" "$opt_tproxy_table"
		printf 'ip -%s route local default dev lo table %s\n' "$_rd_f" "$opt_tproxy_table"
	done
}

# --inbound-source 127.0.0.6: the proxy connects to the app from 127.0.0.6,
# which is on lo already (all of 127.0.0.0/8 is), and for IPv6 from ::6,
# which is not: it goes onto lo as Istio's init step puts it there. Ours
# has the flag nodad, which changes nothing on lo (no duplicate address
# detection runs there) and marks it as ours: an address has no protocol
# that this iproute2 can set. A ::6 that was there before is left.

# passthrough6_present: is ::6/128 on lo?
passthrough6_present() {
	case "$(ip -6 addr show dev lo 2>/dev/null)" in
	*' ::6/128 '*) return 0 ;;
	esac
	return 1
}

# passthrough6_ours: is ::6/128 on lo, with our nodad?
passthrough6_ours() {
	case "$(ip -6 addr show dev lo 2>/dev/null)" in
	*' ::6/128 scope host nodad'* | *' ::6/128 scope global nodad'*) return 0 ;;
	esac
	return 1
}

# passthrough6_install: ::6/128 on lo, if it is not there (routes_added
# records it for routes_rollback).
passthrough6_install() {
	passthrough6_present && return 0
	_pi_err=$(ip -6 addr add ::6/128 dev lo nodad 2>&1) ||
		return_route_error "ip -6 addr add ::6/128 dev lo nodad: $_pi_err" || return 1
	routes_added="${routes_added:-} addr6"
}

# passthrough6_remove: our ::6/128 off lo, if it is there.
passthrough6_remove() {
	passthrough6_ours || return 0
	_pr_err=$(ip -6 addr del ::6/128 dev lo 2>&1) ||
		return_route_error "ip -6 addr del ::6/128 dev lo: $_pr_err" || return 1
}
