# shellcheck shell=sh
# method uid: the proxy runs as a user of its own, and its connections are
# told apart by the owner of the socket (the owner match, xt_owner). The
# design note's chosen method: no privilege and no change in the proxy; the
# proxy and this script only have to agree on the UID (and it must not be a
# UID the app uses). Interface: load_method in lib.sh.

# Loaded by load_method (lib.sh); redirect.sh, cleanup.sh and lib.sh set
# the options and other globals read here:
# shellcheck disable=SC2154

method_validate() {
	check_id --proxy-uid "$opt_proxy_uid"
	[ -z "$opt_proxy_gid" ] || check_id --proxy-gid "$opt_proxy_gid"
}

method_output_bypass() {
	why "The proxy's own connections (it runs as UID $opt_proxy_uid) go out as they are: this is what keeps them from looping back into the proxy."
	rule SIDECAR_OUTPUT "proxy own traffic, uid $opt_proxy_uid" RETURN "uid=$opt_proxy_uid"
	if [ -n "$opt_proxy_gid" ]; then
		why "Also every process of group $opt_proxy_gid (--proxy-gid), e.g. a helper the proxy runs under another UID."
		rule SIDECAR_OUTPUT "proxy own traffic, gid $opt_proxy_gid" RETURN "gid=$opt_proxy_gid"
	fi
}

method_own_traffic() {
	"$1" "uid $opt_proxy_uid" "uid=$opt_proxy_uid"
	[ -z "$opt_proxy_gid" ] || "$1" "gid $opt_proxy_gid" "gid=$opt_proxy_gid"
}
