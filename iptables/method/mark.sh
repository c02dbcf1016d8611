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
	mark_value="$REPLY"
	# in messages and comments a mark is written in hex, as people set it
	mark_hex=$(printf '0x%x' "$REPLY")
}

method_output_bypass() {
	why "The proxy's own connections carry mark $mark_hex (it sets SO_MARK on every socket, including those to the app for inbound connections): they go out as they are, which keeps them from looping back into the proxy."
	rule SIDECAR_OUTPUT "proxy own traffic, mark $mark_hex" RETURN "mark=$mark_value"
}

method_own_traffic() {
	"$1" "mark $mark_hex" "mark=$mark_value"
}
