# shellcheck shell=sh
# method mark: the proxy sets SO_MARK (socket(7)) on every socket it opens
# (`sidecar-proxy run --mark`), and marked packets are not captured (the mark
# match, xt_mark). Setting SO_MARK needs CAP_NET_ADMIN in the proxy, which is
# why the design note does not choose it. Interface: load_method in lib.sh.

# Loaded by load_method (lib.sh); redirect.sh, cleanup.sh and lib.sh set
# the options and other globals read here:
# shellcheck disable=SC2154

method_validate() {
	check_u32 --mark "$opt_mark" mark
	# iptables-save prints marks in hex; render them the same way
	opt_mark=$(printf '0x%x' "$REPLY")
}

method_output_bypass() {
	why "The proxy's own connections carry mark $opt_mark (it sets SO_MARK on every socket, including those to the app for inbound connections): they go out as they are, which keeps them from looping back into the proxy."
	rule SIDECAR_OUTPUT "proxy own traffic, mark $opt_mark" RETURN "mark=$opt_mark"
}
